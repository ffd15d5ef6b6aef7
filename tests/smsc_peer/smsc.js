// An SMSC made with the npm `smpp` package (an SMPP implementation smsgw did not write), for
// tests/integration/test_smpp_peer.py. It listens on 127.0.0.1 (port 0 unless given), prints
// {"event": "listening", "port": P}, then one JSON line on stdout per PDU it receives or
// event it sees. Every submit_sm is checked (data_coding, UDH, TON/NPI) and its record says
// what was wrong in `problems`.
//
//   node smsc.js [--throttle-every N] [--slow-ms MS] [--drop-after N] [--receipt-ms MS]
//
// --throttle-every N  answer every Nth submit_sm ESME_RTHROTTLED
// --slow-ms MS        answer submit_sm after MS milliseconds
// --drop-after N      destroy the connection (no unbind) on the Nth submit_sm, once
// --receipt-ms MS     send a receipt MS after an accepted submit_sm that asked for one:
//                     in text form, every second one with the TLVs as well
'use strict';

const smpp = require('smpp');

const args = process.argv.slice(2);
function option(name, fallback) {
	const at = args.indexOf(name);
	return at >= 0 ? Number(args[at + 1]) : fallback;
}
const throttleEvery = option('--throttle-every', 0);
const slowMs = option('--slow-ms', 0);
const dropAfter = option('--drop-after', 0);
const receiptMs = option('--receipt-ms', 50);
const port = option('--port', 0);

let submits = 0;
let nextId = 1;
let dropped = false;
let receipts = 0;

function emit(record) {
	process.stdout.write(JSON.stringify(record) + '\n');
}

function check(pdu) {
	const problems = [];
	const coding = pdu.data_coding;
	if (coding !== 0 && coding !== 8) problems.push(`data_coding ${coding}`);
	const sm = pdu.short_message || {};
	const udh = (sm.udh || []).map((b) => Buffer.from(b).toString('hex'));
	if (pdu.esm_class & 0x40) {
		if (udh.length !== 1 || !/^0003[0-9a-f]{6}$/.test(udh[0])) problems.push(`udh ${udh}`);
	} else if (udh.length) {
		problems.push('udh without esm_class 0x40');
	}
	if (pdu.dest_addr_ton !== 1 || pdu.dest_addr_npi !== 1) problems.push('destination TON/NPI');
	if (!/^[1-9][0-9]{6,14}$/.test(pdu.destination_addr)) problems.push('destination digits');
	const source = [pdu.source_addr_ton, pdu.source_addr_npi];
	const alpha = source[0] === 5 && source[1] === 0 && /[^0-9]/.test(pdu.source_addr);
	const international = source[0] === 1 && source[1] === 1 && /^[0-9]+$/.test(pdu.source_addr);
	const short = source[0] === 3 && source[1] === 0 && /^[0-9]{1,8}$/.test(pdu.source_addr);
	if (!(alpha || international || short)) problems.push(`source TON/NPI ${source}`);
	if (coding === 8 && sm.message !== undefined && /\ufffd/.test(sm.message)) problems.push('ucs2');
	return {udh, problems};
}

function receipt(session, messageId, withTlvs) {
	const stamp = '2412011200';
	const fields = {
		esm_class: smpp.ESM_CLASS.MC_DELIVERY_RECEIPT,
		short_message: `id:${messageId} sub:001 dlvrd:001 submit date:${stamp} ` +
			`done date:${stamp} stat:DELIVRD err:000 text:`,
	};
	if (withTlvs) {
		fields.receipted_message_id = messageId;
		fields.message_state = 2; // DELIVERED
	}
	session.deliver_sm(fields, (resp) => {
		emit({event: 'deliver_sm_resp', message_id: messageId, status: resp.command_status, tlvs: withTlvs});
	});
}

const server = smpp.createServer((session) => {
	session.on('error', (error) => emit({event: 'error', error: String(error)}));
	for (const bind of ['bind_transceiver', 'bind_transmitter', 'bind_receiver']) {
		session.on(bind, (pdu) => {
			emit({event: bind, system_id: pdu.system_id, password: pdu.password});
			session.send(pdu.response({system_id: 'node-smpp'}));
		});
	}
	session.on('enquire_link', (pdu) => session.send(pdu.response()));
	session.on('unbind', (pdu) => {
		emit({event: 'unbind'});
		session.send(pdu.response());
		session.close();
	});
	session.on('submit_sm', (pdu) => {
		submits += 1;
		const {udh, problems} = check(pdu);
		const sm = pdu.short_message || {};
		const record = {
			event: 'submit_sm',
			n: submits,
			data_coding: pdu.data_coding,
			esm_class: pdu.esm_class,
			source: [pdu.source_addr_ton, pdu.source_addr_npi, pdu.source_addr],
			destination: [pdu.dest_addr_ton, pdu.dest_addr_npi, pdu.destination_addr],
			registered_delivery: pdu.registered_delivery,
			udh,
			text: typeof sm.message === 'string' ? sm.message : null,
			problems,
		};
		if (dropAfter && !dropped && submits === dropAfter) {
			dropped = true;
			emit({...record, status: 'dropped'});
			session.destroy();
			return;
		}
		let status = smpp.ESME_ROK;
		if (throttleEvery && submits % throttleEvery === 0) status = smpp.ESME_RTHROTTLED;
		else if (problems.length) status = 0x0c4; // ESME_RINVOPTPARAMVAL: refused, visibly
		const messageId = status === smpp.ESME_ROK ? (nextId++).toString(16) : '';
		emit({...record, status, message_id: messageId});
		const answer = () => {
			session.send(pdu.response({command_status: status, message_id: messageId}));
			if (messageId && pdu.registered_delivery & 1) {
				setTimeout(() => receipt(session, messageId, receipts++ % 2 === 1), receiptMs);
			}
		};
		if (slowMs) setTimeout(answer, slowMs); else answer();
	});
});

server.listen(port, '127.0.0.1', () => emit({event: 'listening', port: server.address().port}));
process.on('SIGTERM', () => process.exit(0));
