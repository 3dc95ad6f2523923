// The classic Node.js `ws` broadcast server: every message any client sends
// is relayed to every connected client, the sender included. This is the
// pattern from the ws README that most chat servers start from; hubbub-bench
// uses it as the reference peer. Nothing here is tuned on purpose.
//
// Usage: node server.js [port]   (or PORT=... node server.js; default 8081)
// Listens on 127.0.0.1 only unless HOST is set.
'use strict';

const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || process.env.PORT || 8081);
const host = process.env.HOST || '127.0.0.1';

const wss = new WebSocketServer({ host, port });

wss.on('connection', function connection(ws) {
  ws.on('error', console.error);
  ws.on('message', function message(data, isBinary) {
    wss.clients.forEach(function each(client) {
      if (client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    });
  });
});

wss.on('listening', () => {
  const a = wss.address();
  console.log(`reference ws broadcast server listening on ws://${a.address}:${a.port}/ (pid ${process.pid})`);
});

function stop() {
  wss.close();
  process.exit(0);
}
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
