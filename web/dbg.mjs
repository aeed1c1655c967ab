import mqtt from 'mqtt';
import WebSocket from 'ws';
import { readFileSync } from 'node:fs';
const urls = JSON.parse(readFileSync('/tmp/webdbg/urls.json'));
const creds = JSON.parse(readFileSync('/tmp/webdbg/fleet/credentials/dev-000.json'));
const c = mqtt.connect(urls.ws, { username: creds.username, password: creds.password, clientId: 'dev-000', protocolVersion: 5, connectTimeout: 8000, reconnectPeriod: 0,
  createWebsocket: (url) => new WebSocket(url, ['binary'], { ca: creds.ca_pem }) });
c.on('connect', () => { console.log('connected'); c.end(); });
c.on('error', (e) => { console.log('error', e.message); c.end(true); });
c.on('close', () => console.log('close'));
