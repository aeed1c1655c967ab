// What the WebSocket gateway lets a client do, as JSON (tests/test_web_device.py asserts on it):
//   node test/gateway-checks.mjs --wss URL --credentials creds.json --other DEVICE --run RUN
// A wrong password, a publish onto another device's update topic, and one onto the device's own.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import mqtt from 'mqtt';
import WebSocket from 'ws';

const { values: a } = parseArgs({ options: { wss: { type: 'string' }, credentials: { type: 'string' }, other: { type: 'string' }, run: { type: 'string' } } });
const creds = JSON.parse(readFileSync(a.credentials, 'utf8'));

function connect(password) {
  const client = mqtt.connect(a.wss, {
    username: creds.username, password, clientId: creds.username, protocolVersion: 5, reconnectPeriod: 0, connectTimeout: 10_000,
    createWebsocket: (url) => new WebSocket(url, ['binary'], { ca: creds.ca_pem }),
  });
  return new Promise((resolve) => {
    client.once('connect', () => resolve({ client, ok: true }));
    client.once('error', (e) => { client.end(true); resolve({ ok: false, error: e.message, code: e.code }); });
  });
}

const publish = (client, topic) => new Promise((resolve) => client.publish(topic, Buffer.from('x'), { qos: 1 }, (err, pkt) => resolve(err ? { error: err.message, code: err.code } : { ok: true, reasonCode: pkt?.reasonCode ?? 0 })));

const out = {};
const bad = await connect('wrong-password');
out.wrong_password = { connected: bad.ok, error: bad.error ?? null, code: bad.code ?? null };
const good = await connect(creds.password);
out.right_password = { connected: good.ok, error: good.error ?? null };
if (good.ok) {
  out.other_update = await publish(good.client, `devft/${a.run}/update/${a.other}`);
  out.own_fetch = await publish(good.client, `devft/${a.run}/fetch/${creds.username}`);
  good.client.end(true);
}
console.log(JSON.stringify(out));
process.exit(0);
