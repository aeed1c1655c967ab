#!/usr/bin/env node
// A devft fleet device in Node.js, the counterpart of `devft-edge run` (docs/device-client.md):
//   node web/node-device.mjs --credentials creds.json --data client_000.jsonl --cache DIR --run RUN
//        [--host H] [--port P] [--threads 1] [--engine node|web] [--record DIR] [--exit-after-rounds N] [--ram-mb MIB]
//        [--keep-blobs]
// --ram-mb declares the memory this device offers training (default: os.freemem, MemAvailable on Linux); the
// coordinator samples it only for stages whose memory need fits, and refuses it (exit code 4) if none does.
// --engine web trains with onnxruntime-web's WASM build (the browser's numerics) instead of onnxruntime-node.
// --record DIR writes each round's control, global and update frames (round-<wire round>.*) for replays.
// --keep-blobs keeps every stage's files under DIR/blobs/<sha256> (the cache's), so an old round can be replayed.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Device } from './src/device.js';
import { readShard } from './src/data.js';
import { nodeRuntime } from './src/runtime-node.js';

function fail(code, message) {
  console.error(`node-device: error: ${message}`);
  process.exit(code);
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      credentials: { type: 'string' }, data: { type: 'string' }, cache: { type: 'string' }, run: { type: 'string' },
      host: { type: 'string' }, port: { type: 'string' }, threads: { type: 'string', default: '1' },
      engine: { type: 'string', default: 'node' }, record: { type: 'string' }, 'exit-after-rounds': { type: 'string' },
      'ram-mb': { type: 'string' }, 'keep-blobs': { type: 'boolean', default: false },
    },
    allowPositionals: true,
  }));
} catch (e) { fail(2, e.message); }
for (const need of ['credentials', 'data', 'cache', 'run']) if (!args[need]) fail(2, `--${need} is required`);
if (!['node', 'web'].includes(args.engine)) fail(2, `--engine must be node or web, got ${args.engine}`);
const ramMb = args['ram-mb'] === undefined ? undefined : Number(args['ram-mb']);
if (ramMb !== undefined && !(Number.isInteger(ramMb) && ramMb >= 1 && ramMb <= 2 ** 24)) fail(2, `--ram-mb ${args['ram-mb']} must be a whole number of MiB in [1, ${2 ** 24}]`);

let creds, shard;
try { creds = JSON.parse(readFileSync(args.credentials, 'utf8')); } catch (e) { fail(2, `cannot read device credentials ${args.credentials}: ${e.message}; use the JSON from \`devft fleet add-device\``); }
for (const key of ['host', 'port', 'username', 'password', 'ca_pem']) if (!(key in creds)) fail(2, `credentials ${args.credentials} lack ${key}; use the JSON from \`devft fleet add-device\``);
try { shard = readShard(readFileSync(args.data, 'utf8'), args.data); } catch (e) { fail(2, e.message); }
mkdirSync(args.cache, { recursive: true });

const runtime = await nodeRuntime({ cacheDir: args.cache, engine: args.engine, host: args.host, port: args.port ? Number(args.port) : undefined, ramMb });
let onRecord = null;
if (args.record) {
  mkdirSync(args.record, { recursive: true });
  onRecord = (kind, r) => {
    const base = path.join(args.record, `round-${r.control.round}`);
    writeFileSync(`${base}.json`, JSON.stringify({ control: r.control, losses: r.losses, draws: r.draws }));
    writeFileSync(`${base}.global`, r.global);
    writeFileSync(`${base}.update`, r.update);
  };
}
const log = (line) => console.error(`${new Date().toISOString()} ${line}`);
const device = new Device({ runtime, creds, shard, runId: args.run, threads: Number(args.threads), log, onRecord, prune: !args['keep-blobs'] });
const limit = args['exit-after-rounds'] ? Number(args['exit-after-rounds']) : null;
process.on('SIGTERM', () => device.stop());
process.on('SIGINT', () => device.stop());
// a device of a local fleet ends with its coordinator, even a killed one (as devft-edge)
const parent = Number(process.env.DEVFT_EXIT_WITH_PARENT || 0);
const watch = setInterval(() => {
  if ((parent && process.ppid !== parent) || (limit !== null && device.roundsTrained >= limit)) device.stop();
}, 500);
try {
  const code = await device.run();
  clearInterval(watch);
  process.exit(code);
} catch (e) {
  fail(3, e.message);
}
