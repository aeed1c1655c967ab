// Round trip of a device's own messages through the broker (publish QoS 1 on its status topic, receive it
// back on its subscription), directly over MQTT/TLS and through the WebSocket gateway, with the same client:
//   node bench/transport.mjs --credentials creds.json --mqtts HOST:PORT --wss URL [--n 100] [--sizes 200,60000]
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import mqtt from 'mqtt';
import WebSocket from 'ws';

const { values: a } = parseArgs({ options: {
  credentials: { type: 'string' }, mqtts: { type: 'string' }, wss: { type: 'string' }, n: { type: 'string', default: '100' },
  sizes: { type: 'string', default: '200,60000' }, run: { type: 'string', default: 'transportbench' },
} });
const creds = JSON.parse(readFileSync(a.credentials, 'utf8'));
const topic = `devft/${a.run}/status/${creds.username}`;

async function connect(kind) {
  const common = { username: creds.username, password: creds.password, clientId: creds.username, protocolVersion: 5, reconnectPeriod: 0, clean: true };
  const t0 = performance.now();
  const [host, port] = a.mqtts.split(':');
  const client = kind === 'mqtts'
    ? mqtt.connect({ ...common, protocol: 'mqtts', host, port: Number(port), ca: creds.ca_pem, servername: 'localhost' })
    : mqtt.connect(a.wss, { ...common, createWebsocket: (url) => new WebSocket(url, ['binary'], { ca: creds.ca_pem }) });
  await new Promise((resolve, reject) => { client.once('connect', resolve); client.once('error', reject); });
  client.stream?.setNoDelay?.(true);
  return { client, connectS: (performance.now() - t0) / 1000 };
}

const median = (xs) => { const s = [...xs].sort((x, y) => x - y); return s[s.length >> 1]; };
const out = [];
for (const kind of ['mqtts', 'wss']) {
  const { client, connectS } = await connect(kind);
  await new Promise((resolve) => client.subscribe(topic, { qos: 1 }, resolve));
  for (const size of a.sizes.split(',').map(Number)) {
    const times = [];
    for (let i = 0; i < Number(a.n); i++) {
      const payload = Buffer.alloc(size, i % 251);
      const t0 = performance.now();
      await new Promise((resolve) => {
        const on = (t, p) => { if (t === topic && p.length === size && p[0] === i % 251) { client.off('message', on); resolve(); } };
        client.on('message', on);
        client.publish(topic, payload, { qos: 1 });
      });
      times.push((performance.now() - t0) / 1000);
    }
    out.push({ transport: kind, bytes: size, n: times.length, round_trip_median_s: median(times), connect_s: connectS });
  }
  await new Promise((resolve) => client.end(false, {}, resolve));
}
console.log(JSON.stringify(out));
process.exit(0);
