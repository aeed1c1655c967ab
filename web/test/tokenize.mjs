// Print the device's tokenisation of a shard as JSON ([[ids, labels], ...]) for comparison with Python:
//   node test/tokenize.mjs tokenizer.json shard.jsonl SEQ_LEN
import { readFileSync } from 'node:fs';
import { encodeShard, loadTokenizer, readShard } from '../src/data.js';

const [tokPath, shardPath, seqLen] = process.argv.slice(2);
const tok = loadTokenizer(readFileSync(tokPath, 'utf8'));
process.stdout.write(JSON.stringify(encodeShard(tok, readShard(readFileSync(shardPath, 'utf8'), shardPath), Number(seqLen))));
