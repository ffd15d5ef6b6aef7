"""The simulation harness: scenarios run in virtual time or against a real node on the wall
clock, judged and reported (run, virtual, scenarios, report), and `smsgw bench`, which runs
the benchmarks and the simulator into one report. The fakes it drives are in smsgw.sim."""
