/**
 * The control endpoint: /metrics (Prometheus), /healthz (the process is alive), /readyz (every
 * configured door is listening). Read-only; binds where --metrics-listen says (loopback default).
 */
import http from 'node:http';
import type { Registry } from 'prom-client';

export class ControlServer {
  private readonly server: http.Server;
  ready = false;
  address = '';

  constructor(private readonly registry: Registry) {
    this.server = http.createServer((req, res) => void this.route(req, res));
  }

  async listen(hostPort: string): Promise<void> {
    const { host, port } = splitHostPort(hostPort, 'metrics-listen');
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => resolve());
    });
    const a = this.server.address();
    this.address = typeof a === 'object' && a ? `${a.address.includes(':') ? `[${a.address}]` : a.address}:${a.port}` : hostPort;
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  private async route(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' }).end();
      return;
    }
    if (url === '/metrics') {
      try {
        const body = await this.registry.metrics();
        res.writeHead(200, { 'content-type': this.registry.contentType }).end(body);
      } catch (err) {
        res.writeHead(500).end(`metrics collection failed: ${(err as Error).message}\n`);
      }
    } else if (url === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
    } else if (url === '/readyz') {
      res.writeHead(this.ready ? 200 : 503, { 'content-type': 'text/plain' }).end(this.ready ? 'ready\n' : 'starting\n');
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics, /healthz, /readyz\n');
    }
  }
}

/** 'host:port' or '[v6]:port' → parts; errors name the option. */
export function splitHostPort(text: string, option: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(text);
  if (!m) throw new Error(`${option}: expected HOST:PORT, got "${text}"`);
  const port = Number(m[3]);
  if (port > 65535) throw new Error(`${option}: port ${port} is out of range`);
  return { host: (m[1] ?? m[2])!, port };
}
