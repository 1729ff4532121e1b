/**
 * Keeps the shipped configuration honest:
 *  - every YAML under envoy/ and deploy/ parses (multi-document);
 *  - the tap parts of the Envoy configs (the Tap transport socket's typed_config, TapRequests,
 *    OutputConfig, sinks, the UDP sink) are walked strictly against meshcap's own proto
 *    definitions (unknown or misspelt field names, wrong JSON types, two members of a oneof all
 *    fail), then `Type.fromObject` + `verify` + an encode/decode round trip, then Envoy's own
 *    validation rules that a schema can't express;
 *  - the Kubernetes manifests carry the PodSecurity "restricted" securityContext and agree with
 *    meshcap's defaults and flags (metrics port and paths, the socket path in the Envoy
 *    streaming_grpc example, volumes), and the Dockerfile is the multi-stage, non-root build.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import protobuf from 'protobufjs';
import { describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';
import { defaultServeValues, loadServeConfig, SERVE_OPTIONS } from '../../src/config.js';
import { buildTapRequest, validateAdminUrl } from '../../src/ingest/admin-tap-client.js';
import { loadSchema } from '../../src/ingest/proto-schema.js';
import { parseUdpListen } from '../../src/ingest/udp-tap-listener.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const rel = (p: string) => path.relative(repoRoot, p);

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

// ---------------------------------------------------------------------------------------------
// YAML

function yamlFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...yamlFiles(p));
    else if (/\.ya?ml$/.test(e.name)) out.push(p);
  }
  return out.sort();
}

function loadYaml(file: string): unknown[] {
  const docs = parseAllDocuments(fs.readFileSync(file, 'utf8'));
  const list = Array.isArray(docs) ? docs : [docs];
  for (const d of list) {
    if (d.errors.length) throw new Error(`${rel(file)}: ${d.errors.map((e) => e.message).join('; ')}`);
  }
  return list.map((d) => d.toJS()).filter((d) => d !== null && d !== undefined);
}

const ENVOY_FILES = yamlFiles(path.join(repoRoot, 'envoy'));
const DEPLOY_FILES = yamlFiles(path.join(repoRoot, 'deploy'));

/** Every object in a YAML tree, with its path. */
function* walk(v: unknown, p = '$'): Generator<[Obj, string]> {
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) yield* walk(v[i], `${p}[${i}]`);
  } else if (isObj(v)) {
    yield [v, p];
    for (const [k, x] of Object.entries(v)) yield* walk(x, `${p}.${k}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Strict proto walk

const schema = loadSchema([
  'envoy/admin/v3/tap.proto',
  'envoy/extensions/transport_sockets/tap/v3/tap.proto',
  'envoy/extensions/tap_sinks/udp_sink/v3alpha/udp_sink.proto',
]);
const T = (name: string) => schema.lookupType(name);
const TAP_URL = 'type.googleapis.com/envoy.extensions.transport_sockets.tap.v3.Tap';

/** Any types meshcap does not model: accepted as opaque inside a tap config (the wrapped socket). */
const OPAQUE_ANY = new Set([
  'type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext',
  'type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext',
  'type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer',
]);

const WRAPPERS: Record<string, 'int' | 'uint' | 'bool' | 'string' | 'float'> = {
  '.google.protobuf.UInt32Value': 'uint',
  '.google.protobuf.UInt64Value': 'uint',
  '.google.protobuf.Int32Value': 'int',
  '.google.protobuf.Int64Value': 'int',
  '.google.protobuf.BoolValue': 'bool',
  '.google.protobuf.StringValue': 'string',
  '.google.protobuf.DoubleValue': 'float',
  '.google.protobuf.FloatValue': 'float',
};

const INT_TYPES = new Set(['int32', 'uint32', 'sint32', 'fixed32', 'sfixed32', 'int64', 'uint64', 'sint64', 'fixed64', 'sfixed64']);

/**
 * Walks `value` (Envoy's YAML/JSON form) against `type`, rejecting unknown field names (snake_case
 * only), values of the wrong JSON type and oneof conflicts, and returns the protobufjs form
 * (wrappers → {value}, Duration → {seconds, nanos}, Any → {type_url, value: encoded bytes}).
 */
function strict(type: protobuf.Type, value: unknown, p: string, errors: string[]): Obj {
  const out: Obj = {};
  if (!isObj(value)) {
    errors.push(`${p}: expected a ${type.name} object, got ${JSON.stringify(value)}`);
    return out;
  }
  const oneofs = new Map<string, string>();
  for (const [key, v] of Object.entries(value)) {
    const f = Object.hasOwn(type.fields, key) ? type.fields[key] : undefined;
    if (!f) {
      errors.push(`${p}.${key}: unknown field of ${type.fullName.slice(1)}`);
      continue;
    }
    f.resolve();
    if (f.partOf) {
      const prior = oneofs.get(f.partOf.name);
      if (prior) errors.push(`${p}: "${prior}" and "${key}" both set, but they are members of oneof ${f.partOf.name}`);
      oneofs.set(f.partOf.name, key);
    }
    if (f.repeated) {
      if (!Array.isArray(v)) errors.push(`${p}.${key}: expected a list`);
      else out[key] = v.map((e, i) => convert(f, e, `${p}.${key}[${i}]`, errors));
    } else {
      out[key] = convert(f, v, `${p}.${key}`, errors);
    }
  }
  return out;
}

function convert(f: protobuf.Field, v: unknown, p: string, errors: string[]): unknown {
  const rt = f.resolvedType;
  if (rt instanceof protobuf.Type) {
    const wrapped = WRAPPERS[rt.fullName];
    if (wrapped) {
      const ok = wrapped === 'bool' ? typeof v === 'boolean' : wrapped === 'string' ? typeof v === 'string' : typeof v === 'number' && (wrapped === 'float' || (Number.isInteger(v) && (wrapped === 'int' || v >= 0)));
      if (!ok) errors.push(`${p}: expected a ${wrapped} (${rt.name}), got ${JSON.stringify(v)}`);
      return { value: v };
    }
    if (rt.fullName === '.google.protobuf.Duration') {
      const m = typeof v === 'string' ? /^(\d+)(?:\.(\d{1,9}))?s$/.exec(v) : null;
      if (!m) errors.push(`${p}: expected a duration like "0.2s", got ${JSON.stringify(v)}`);
      return m ? { seconds: Number(m[1]), nanos: Number((m[2] ?? '').padEnd(9, '0')) } : {};
    }
    if (rt.fullName === '.google.protobuf.Any') {
      if (!isObj(v) || typeof v['@type'] !== 'string') {
        errors.push(`${p}: expected a typed_config with "@type"`);
        return {};
      }
      const url = v['@type'];
      const { ['@type']: _t, ...rest } = v;
      const name = url.slice(url.lastIndexOf('/') + 1);
      const inner = schema.lookup(name);
      if (inner instanceof protobuf.Type) {
        const obj = strict(inner, rest, `${p}<${name}>`, errors);
        const bad = inner.verify(obj);
        if (bad) errors.push(`${p}<${name}>: ${bad}`);
        return { type_url: url, value: inner.encode(inner.fromObject(obj)).finish() };
      }
      if (!OPAQUE_ANY.has(url)) errors.push(`${p}: "@type" ${url} is neither modelled by meshcap's protos nor a known wrapped socket`);
      return { type_url: url, value: new Uint8Array(0) };
    }
    return strict(rt, v, p, errors);
  }
  if (rt instanceof protobuf.Enum) {
    if (typeof v === 'string' ? !(v in rt.values) : !(typeof v === 'number' && v in rt.valuesById)) {
      errors.push(`${p}: ${JSON.stringify(v)} is not a ${rt.name} (${Object.keys(rt.values).join(', ')})`);
      return v;
    }
    return typeof v === 'string' ? rt.values[v] : v; // protobufjs' object form holds enum numbers
  }
  if (f.type === 'string' && typeof v !== 'string') errors.push(`${p}: expected a string, got ${JSON.stringify(v)}`);
  if (f.type === 'bool' && typeof v !== 'boolean') errors.push(`${p}: expected true/false, got ${JSON.stringify(v)}`);
  if (INT_TYPES.has(f.type) && !(Number.isInteger(v) || (typeof v === 'string' && /^-?\d+$/.test(v)))) errors.push(`${p}: expected an integer, got ${JSON.stringify(v)}`);
  if (f.type.startsWith('uint') && Number(v) < 0) errors.push(`${p}: must not be negative`);
  if (f.type === 'bytes' && typeof v !== 'string') errors.push(`${p}: expected base64 bytes`);
  return v;
}

/** Strict walk, then protobufjs verify/fromObject and a round trip. Returns errors (empty = valid). */
function check(typeName: string, value: unknown, where: string): string[] {
  const type = T(typeName);
  const errors: string[] = [];
  const obj = strict(type, value, where, errors);
  const bad = type.verify(obj);
  if (bad) errors.push(`${where}: verify: ${bad}`);
  if (errors.length === 0) {
    const msg = type.fromObject(obj);
    const again = type.decode(type.encode(msg).finish());
    expect(type.toObject(again, { longs: String, bytes: String })).toEqual(type.toObject(msg, { longs: String, bytes: String }));
  }
  return errors.concat(envoyRules(typeName, value, where));
}

/** Envoy's validation rules (PGV annotations and code) that matter for these configs. */
function envoyRules(typeName: string, value: unknown, where: string): string[] {
  const errors: string[] = [];
  const tapConfig = (tc: unknown, p: string, viaAdmin: boolean): void => {
    if (!isObj(tc)) return void errors.push(`${p}: tap_config is required`);
    if (!tc.match && !tc.match_config) errors.push(`${p}: Envoy rejects a TapConfig with neither match nor match_config`);
    const oc = tc.output_config;
    if (!isObj(oc)) return void errors.push(`${p}.output_config: required`);
    const sinks = oc.sinks;
    if (!Array.isArray(sinks) || sinks.length !== 1) return void errors.push(`${p}.output_config.sinks: exactly one sink`);
    const sink = sinks[0] as Obj;
    const kinds = ['streaming_admin', 'file_per_tap', 'streaming_grpc', 'buffered_admin', 'custom_sink'].filter((k) => k in sink);
    if (kinds.length !== 1) errors.push(`${p}.output_config.sinks[0]: exactly one sink type`);
    const format = (sink.format as string | undefined) ?? 'JSON_BODY_AS_BYTES';
    if ((kinds[0] === 'streaming_admin' || kinds[0] === 'buffered_admin') && !viaAdmin) errors.push(`${p}: ${kinds[0]} only works in a TapRequest posted to /tap`);
    if (kinds[0] === 'streaming_admin' && !format.startsWith('JSON_')) errors.push(`${p}: streaming_admin only supports JSON formats`);
    if (kinds[0] === 'streaming_grpc' && format !== 'PROTO_BINARY') errors.push(`${p}: streaming_grpc needs format PROTO_BINARY`);
    if (kinds[0] === 'file_per_tap' && oc.streaming === true && format === 'PROTO_BINARY') errors.push(`${p}: streamed PROTO_BINARY files are undelimited; use PROTO_BINARY_LENGTH_DELIMITED`);
    if (kinds[0] === 'custom_sink') {
      const cs = sink.custom_sink as Obj;
      const tc2 = cs.typed_config as Obj | undefined;
      if (cs.name === 'envoy.tap_sinks.udp_sink') {
        const a = (tc2?.udp_address ?? {}) as Obj;
        if (a.protocol !== 'UDP') errors.push(`${p}: the UDP sink's udp_address.protocol must be UDP`);
        if (format === 'PROTO_BINARY_LENGTH_DELIMITED') errors.push(`${p}: the UDP sink does not support PROTO_BINARY_LENGTH_DELIMITED`);
        try {
          parseUdpListen(`${String(a.address).includes(':') ? `[${a.address}]` : a.address}:${a.port_value}`);
        } catch (err) {
          errors.push(`${p}: meshcap would not listen there: ${(err as Error).message}`);
        }
      }
    }
    for (const k of ['max_buffered_rx_bytes', 'max_buffered_tx_bytes']) {
      if (oc.streaming === true && !(typeof oc[k] === 'number' && oc[k] > 1024)) errors.push(`${p}.output_config.${k}: raise it above Envoy's 1 KiB default or streamed bodies are cut`);
    }
  };
  if (typeName === 'envoy.admin.v3.TapRequest') {
    const v = value as Obj;
    if (typeof v.config_id !== 'string' || !v.config_id) errors.push(`${where}.config_id: required`);
    tapConfig(v.tap_config, `${where}.tap_config`, true);
  } else if (typeName === 'envoy.extensions.transport_sockets.tap.v3.Tap') {
    const v = value as Obj;
    const cc = v.common_config as Obj | undefined;
    if (!isObj(cc)) errors.push(`${where}.common_config: required`);
    else if (isObj(cc.admin_config) === isObj(cc.static_config)) errors.push(`${where}.common_config: exactly one of admin_config and static_config`);
    else if (isObj(cc.admin_config) && !(cc.admin_config as Obj).config_id) errors.push(`${where}.common_config.admin_config.config_id: must be non-empty`);
    else if (isObj(cc.static_config)) tapConfig(cc.static_config, `${where}.common_config.static_config`, false);
    if (!isObj(v.transport_socket)) errors.push(`${where}.transport_socket: required (the wrapped socket)`);
  }
  return errors;
}

/** Every `envoy.transport_sockets.tap` transport socket in a YAML tree. */
function tapSockets(doc: unknown): Array<{ typed: Obj; where: string }> {
  const out: Array<{ typed: Obj; where: string }> = [];
  for (const [o, p] of walk(doc)) {
    if (o.name === 'envoy.transport_sockets.tap' && isObj(o.typed_config)) out.push({ typed: o.typed_config, where: `${p}.typed_config` });
  }
  return out;
}

const withoutType = (o: Obj): Obj => {
  const { ['@type']: _t, ...rest } = o;
  return rest;
};

// ---------------------------------------------------------------------------------------------

describe('shipped YAML', () => {
  it('every YAML under envoy/ and deploy/ parses', () => {
    expect(ENVOY_FILES.length).toBeGreaterThanOrEqual(6);
    expect(DEPLOY_FILES.length).toBeGreaterThanOrEqual(7);
    for (const f of [...ENVOY_FILES, ...DEPLOY_FILES]) expect(() => loadYaml(f), rel(f)).not.toThrow();
  });
});

describe('Envoy configs against meshcap\'s proto definitions', () => {
  const docs = ENVOY_FILES.map((f) => ({ file: rel(f), docs: loadYaml(f) }));

  it('every tap transport socket is a valid envoy.extensions.transport_sockets.tap.v3.Tap', () => {
    let n = 0;
    for (const { file, docs: ds } of docs) {
      for (const d of ds) {
        for (const { typed, where } of tapSockets(d)) {
          n++;
          expect(typed['@type'], `${file} ${where}`).toBe(TAP_URL);
          expect(check('envoy.extensions.transport_sockets.tap.v3.Tap', withoutType(typed), `${file} ${where}`)).toEqual([]);
        }
      }
    }
    // Bootstrap variants (admin, UDP, file, gRPC), the Istio EnvoyFilter and its deploy/ copy.
    expect(n).toBe(5);
  });

  it('the TapRequest example and the one meshcap sends are valid envoy.admin.v3.TapRequests', () => {
    const [example] = loadYaml(path.join(repoRoot, 'envoy/tap-request.yaml'));
    expect(check('envoy.admin.v3.TapRequest', example, 'envoy/tap-request.yaml')).toEqual([]);
    expect(check('envoy.admin.v3.TapRequest', buildTapRequest('meshcap_inbound'), 'buildTapRequest')).toEqual([]);
    // The example is exactly what meshcap posts with its defaults.
    expect(example).toEqual(buildTapRequest('meshcap_inbound'));
  });

  it('a misspelt field, a wrong JSON type, a oneof conflict or a missing match fails', () => {
    const [admin] = loadYaml(path.join(repoRoot, 'envoy/sidecar-admin-tap.yaml'));
    const tap = withoutType(tapSockets(admin)[0]!.typed);
    const mutate = (f: (o: Obj) => void): Obj => {
      const o = structuredClone(tap);
      f(o);
      return o;
    };
    const errs = (o: Obj) => check('envoy.extensions.transport_sockets.tap.v3.Tap', o, 'tap');
    expect(errs(tap)).toEqual([]);
    expect(errs(mutate((o) => ((o.common_config as Obj).admin_config = { configid: 'x' })))).toEqual(expect.arrayContaining([expect.stringMatching(/configid: unknown field of envoy\.extensions\.common\.tap\.v3\.AdminConfig/)]));
    expect(errs(mutate((o) => ((o as Obj).commonConfig = o.common_config)))).toEqual(expect.arrayContaining([expect.stringMatching(/commonConfig: unknown field/)]));
    // envoyproxy/envoy#18538: admin_config and static_config together.
    expect(errs(mutate((o) => ((o.common_config as Obj).static_config = { match: { any_match: true }, output_config: { sinks: [{ file_per_tap: { path_prefix: '/tmp/t' } }] } })))).toEqual(
      expect.arrayContaining([expect.stringMatching(/"admin_config" and "static_config" both set/)]),
    );
    const [udp] = loadYaml(path.join(repoRoot, 'envoy/sidecar-udp-sink.yaml'));
    const u = withoutType(tapSockets(udp)[0]!.typed);
    const oc = () => (((structuredClone(u).common_config as Obj).static_config as Obj).output_config as Obj);
    const withOc = (f: (oc: Obj) => void): Obj => {
      const o = structuredClone(u);
      f(((o.common_config as Obj).static_config as Obj).output_config as Obj);
      return o;
    };
    expect(oc().max_buffered_rx_bytes).toBe(1048576);
    expect(errs(u)).toEqual([]);
    expect(errs(withOc((c) => ((c.max_bufferd_rx_bytes = 5), delete c.max_buffered_rx_bytes)))).toEqual(expect.arrayContaining([expect.stringMatching(/max_bufferd_rx_bytes: unknown field of envoy\.config\.tap\.v3\.OutputConfig/)]));
    expect(errs(withOc((c) => (c.streaming = 'yes')))).toEqual(expect.arrayContaining([expect.stringMatching(/streaming: expected true\/false/)]));
    expect(errs(withOc((c) => ((c.sinks as Obj[])[0]!.format = 'PROTO_BINRY')))).toEqual(expect.arrayContaining([expect.stringMatching(/"PROTO_BINRY" is not a Format/)]));
    expect(errs(withOc((c) => ((((c.sinks as Obj[])[0]!.custom_sink as Obj).typed_config as Obj).udp_adress = {})))).toEqual(
      expect.arrayContaining([expect.stringMatching(/udp_adress: unknown field of envoy\.extensions\.tap_sinks\.udp_sink\.v3alpha\.UdpSink/)]),
    );
    expect(errs(withOc((c) => ((((c.sinks as Obj[])[0]!.custom_sink as Obj).typed_config as Obj).udp_address = { protocol: 'UDP', address: '10.0.0.1', port_value: 9470 })))).toEqual(
      expect.arrayContaining([expect.stringMatching(/meshcap would not listen there/)]),
    );
    expect(errs(withOc((c) => delete c.max_buffered_tx_bytes))).toEqual(expect.arrayContaining([expect.stringMatching(/max_buffered_tx_bytes: raise it/)]));
    const noMatch = structuredClone(u);
    delete ((noMatch.common_config as Obj).static_config as Obj).match;
    expect(errs(noMatch)).toEqual(expect.arrayContaining([expect.stringMatching(/neither match nor match_config/)]));
    const req = buildTapRequest('x') as Obj;
    ((req.tap_config as Obj).output_config as Obj).max_buffered_rx_bytes = -1;
    expect(check('envoy.admin.v3.TapRequest', req, 'req')).toEqual(expect.arrayContaining([expect.stringMatching(/expected a uint/)]));
  });

  it('each variant uses the sink its README line says, with the Envoy-version caveats written down', () => {
    const sinkOf = (file: string): string => {
      const [d] = loadYaml(path.join(repoRoot, 'envoy', file));
      const cc = tapSockets(d)[0]!.typed.common_config as Obj;
      if (cc.admin_config) return 'admin';
      const sink = (((cc.static_config as Obj).output_config as Obj).sinks as Obj[])[0]!;
      return Object.keys(sink).find((k) => k !== 'format')!;
    };
    expect(sinkOf('sidecar-admin-tap.yaml')).toBe('admin');
    expect(sinkOf('sidecar-udp-sink.yaml')).toBe('custom_sink');
    expect(sinkOf('sidecar-file-per-tap.yaml')).toBe('file_per_tap');
    expect(sinkOf('sidecar-streaming-grpc.yaml')).toBe('streaming_grpc');
    const readme = fs.readFileSync(path.join(repoRoot, 'envoy/README.md'), 'utf8');
    for (const f of ['sidecar-admin-tap.yaml', 'sidecar-udp-sink.yaml', 'sidecar-file-per-tap.yaml', 'sidecar-streaming-grpc.yaml', 'istio/inbound-tap-envoyfilter.yaml']) {
      const line = readme.split('\n').find((l) => l.includes(f));
      expect(line, f).toMatch(/Envoy|Istio|custom builds/);
    }
    expect(fs.readFileSync(path.join(repoRoot, 'envoy/sidecar-streaming-grpc.yaml'), 'utf8')).toMatch(/CUSTOM ENVOY BUILDS ONLY[\s\S]*PANICS/);
  });

  it('the Istio EnvoyFilter wraps the inbound mTLS chain and documents its limits; deploy/ carries an identical copy', () => {
    const [ef] = loadYaml(path.join(repoRoot, 'envoy/istio/inbound-tap-envoyfilter.yaml')) as Obj[];
    expect(ef).toMatchObject({ apiVersion: 'networking.istio.io/v1alpha3', kind: 'EnvoyFilter' });
    const patch = ((ef!.spec as Obj).configPatches as Obj[])[0]!;
    expect(patch).toMatchObject({ applyTo: 'FILTER_CHAIN', match: { context: 'SIDECAR_INBOUND', listener: { filterChain: { transportProtocol: 'tls' } } }, patch: { operation: 'MERGE' } });
    const inner = (tapSockets(ef)[0]!.typed.transport_socket as Obj).typed_config as Obj;
    expect(inner['@type']).toBe('type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext');
    const text = fs.readFileSync(path.join(repoRoot, 'envoy/istio/inbound-tap-envoyfilter.yaml'), 'utf8');
    expect(text).toMatch(/transport_socket_matches/);
    expect(text).toMatch(/istioctl proxy-config listener/);
    const [copy] = loadYaml(path.join(repoRoot, 'deploy/overlays/istio-admin-tap/envoyfilter.yaml'));
    expect(copy).toEqual(ef);
  });
});

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests

interface Container {
  name: string;
  args?: string[];
  ports?: Array<{ name?: string; containerPort: number; protocol?: string }>;
  securityContext?: Obj;
  livenessProbe?: { httpGet?: { path: string; port: string | number } };
  readinessProbe?: { httpGet?: { path: string; port: string | number } };
  resources?: { requests?: Obj; limits?: Obj };
  volumeMounts?: Array<{ name: string; mountPath: string }>;
}

const deployDocs = () => DEPLOY_FILES.flatMap((f) => loadYaml(f).map((d) => ({ file: rel(f), doc: d as Obj })));
const byKind = (kind: string) => deployDocs().filter((d) => d.doc.kind === kind);

function baseDeployment(): { pod: Obj; annotations: Obj; containers: Container[]; volumes: Obj[] } {
  const d = byKind('Deployment').find((x) => x.file === 'deploy/base/deployment.yaml')!.doc;
  const tpl = (d.spec as Obj).template as Obj;
  const pod = tpl.spec as Obj;
  return { pod, annotations: ((tpl.metadata as Obj).annotations ?? {}) as Obj, containers: pod.containers as Container[], volumes: pod.volumes as Obj[] };
}

const meshcap = () => baseDeployment().containers.find((c) => c.name === 'meshcap')!;

function flagValue(args: string[], ...names: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) if (names.includes(args[i]!)) out.push(args[i + 1]!);
  return out;
}

describe('Kubernetes manifests', () => {
  it('PodSecurity "restricted": non-root, read-only root, no capabilities, RuntimeDefault seccomp, no privilege escalation', () => {
    const { pod, containers } = baseDeployment();
    const podSc = pod.securityContext as Obj;
    expect(podSc).toMatchObject({ runAsNonRoot: true, seccompProfile: { type: 'RuntimeDefault' } });
    for (const c of containers) {
      const sc = c.securityContext!;
      expect(sc, c.name).toMatchObject({ allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: { drop: ['ALL'] }, runAsNonRoot: true, seccompProfile: { type: 'RuntimeDefault' } });
      expect((sc.capabilities as Obj).add, c.name).toBeUndefined();
      expect(sc.privileged, c.name).not.toBe(true);
      expect(sc.runAsUser, c.name).not.toBe(0);
      expect(c.resources?.requests, c.name).toBeDefined();
      expect(c.resources?.limits?.memory, c.name).toBeDefined();
    }
    expect(pod.hostNetwork).toBeUndefined();
    expect(pod.hostPID).toBeUndefined();
  });

  it('meshcap runs `serve --grpc-listen unix:/var/run/meshcap/tap.sock --metrics-listen 0.0.0.0:9464 -w /captures/meshcap.pcapng -C 100 -W 10`, flags that meshcap accepts', () => {
    const c = meshcap();
    expect(c.args).toEqual(['serve', '--grpc-listen', 'unix:/var/run/meshcap/tap.sock', '--metrics-listen', '0.0.0.0:9464', '-w', '/captures/meshcap.pcapng', '-C', '100', '-W', '10']);
    const cfg = loadServeConfig(c.args!.slice(1), {}, '/');
    expect(cfg).toMatchObject({ grpcListen: ['unix:/var/run/meshcap/tap.sock'], metricsListen: '0.0.0.0:9464', write: '/captures/meshcap.pcapng', fileSizeMB: 100, ring: 10 });
  });

  it('ports and paths agree with meshcap\'s defaults, the probes, the Service, the ServiceMonitor and the NetworkPolicy', () => {
    const defaults = defaultServeValues('/');
    const defaultPort = Number(String(defaults['metrics-listen']).split(':').pop());
    expect(defaultPort).toBe(9464);
    const c = meshcap();
    const port = Number(flagValue(c.args!, '--metrics-listen')[0]!.split(':').pop());
    expect(port).toBe(defaultPort);
    const named = c.ports!.find((p) => p.containerPort === port)!;
    expect(named.name).toBe('meshcap-metrics');
    expect(c.livenessProbe?.httpGet).toEqual({ path: '/healthz', port: named.name });
    expect(c.readinessProbe?.httpGet).toEqual({ path: '/readyz', port: named.name });
    // Only the metrics port is exposed by meshcap.
    expect(c.ports!.map((p) => p.containerPort)).toEqual([port]);

    const svc = byKind('Service').find((s) => (s.doc.metadata as Obj).name === 'myapp-meshcap-metrics')!.doc;
    const sp = ((svc.spec as Obj).ports as Obj[])[0]!;
    expect(sp).toMatchObject({ name: 'meshcap-metrics', port, targetPort: named.name });
    const sm = byKind('ServiceMonitor')[0]!.doc;
    expect((sm.spec as Obj).endpoints).toEqual([expect.objectContaining({ port: 'meshcap-metrics', path: '/metrics' })]);
    // The ServiceMonitor selects the metrics Service by its labels.
    const selector = ((sm.spec as Obj).selector as Obj).matchLabels as Obj;
    expect(Object.keys(selector).length).toBeGreaterThan(0);
    expect((svc.metadata as Obj).labels).toEqual(expect.objectContaining(selector));

    const np = byKind('NetworkPolicy')[0]!.doc;
    const spec = np.spec as Obj;
    expect(spec.policyTypes).toEqual(['Ingress']);
    const rules = spec.ingress as Array<{ from?: unknown[]; ports: Array<{ port: number }> }>;
    const metricsRule = rules.find((r) => r.ports.some((p) => p.port === port))!;
    expect(metricsRule.from?.length).toBeGreaterThan(0); // not open to everyone
    const exposed = rules.flatMap((r) => r.ports.map((p) => p.port));
    const appPorts = baseDeployment().containers.filter((x) => x.name !== 'meshcap').flatMap((x) => (x.ports ?? []).map((p) => p.containerPort));
    expect(exposed.sort()).toEqual([...appPorts, port].sort());
    // Istio must not put the metrics port behind mTLS, or Prometheus can't scrape it.
    expect(baseDeployment().annotations['traffic.sidecar.istio.io/excludeInboundPorts']).toBe(String(port));
  });

  it('the gRPC socket path matches the Envoy streaming_grpc example and lives on an emptyDir shared with istio-proxy; captures have a volume', () => {
    const [grpcExample] = loadYaml(path.join(repoRoot, 'envoy/sidecar-streaming-grpc.yaml'));
    const pipes = [...walk(grpcExample)].filter(([o]) => isObj(o.pipe)).map(([o]) => (o.pipe as Obj).path as string);
    expect(pipes).toEqual(['/var/run/meshcap/tap.sock']);
    const c = meshcap();
    const listen = flagValue(c.args!, '--grpc-listen')[0]!;
    expect(listen).toBe(`unix:${pipes[0]}`);
    const { volumes, annotations } = baseDeployment();
    const sockDir = path.posix.dirname(pipes[0]!);
    const mount = c.volumeMounts!.find((m) => m.mountPath === sockDir)!;
    expect(volumes.find((v) => v.name === mount.name)).toHaveProperty('emptyDir');
    const proxyMounts = JSON.parse(String(annotations['sidecar.istio.io/userVolumeMount'])) as Array<{ name: string; mountPath: string }>;
    expect(proxyMounts).toEqual([{ name: mount.name, mountPath: sockDir }]);
    const capDir = path.posix.dirname(flagValue(c.args!, '-w', '--write')[0]!);
    const capMount = c.volumeMounts!.find((m) => m.mountPath === capDir)!;
    expect(volumes.find((v) => v.name === capMount.name)).toBeDefined();
    // The file_per_tap example writes into the shared directory too.
    expect(fs.readFileSync(path.join(repoRoot, 'envoy/sidecar-file-per-tap.yaml'), 'utf8')).toContain(`path_prefix: ${sockDir}/taps/tap`);
  });

  it('the stock-Istio overlay points meshcap at the proxy admin with the EnvoyFilter\'s config_id, and every flag exists', () => {
    const [patch] = loadYaml(path.join(repoRoot, 'deploy/overlays/istio-admin-tap/meshcap-admin-args.yaml')) as Obj[];
    const args = ((((patch!.spec as Obj).template as Obj).spec as Obj).containers as Container[])[0]!.args!;
    const [ef] = loadYaml(path.join(repoRoot, 'deploy/overlays/istio-admin-tap/envoyfilter.yaml'));
    const configId = ((tapSockets(ef)[0]!.typed.common_config as Obj).admin_config as Obj).config_id;
    expect(flagValue(args, '--tap-config-id')).toEqual([configId]);
    const admin = flagValue(args, '--envoy-admin');
    expect(admin).toEqual(['http://127.0.0.1:15000']);
    expect(() => validateAdminUrl(admin[0]!)).not.toThrow();
    // Every long flag in every manifest is one meshcap serve knows.
    const known = new Set(SERVE_OPTIONS.map((o) => `--${o.name}`));
    for (const a of [...args, ...meshcap().args!]) if (a.startsWith('--')) expect(known.has(a), a).toBe(true);
    // The rest of the args are the base's.
    const base = meshcap().args!;
    expect(args.filter((a, i) => !['--envoy-admin', '--tap-config-id'].includes(a) && !['--envoy-admin', '--tap-config-id'].includes(args[i - 1]!))).toEqual(base);
  });

  it.skipIf(!hasKubectl())('kubectl kustomize renders the base and the overlay', () => {
    for (const dir of ['deploy/base', 'deploy/overlays/istio-admin-tap']) {
      const out = execFileSync('kubectl', ['kustomize', path.join(repoRoot, dir)], { encoding: 'utf8' });
      const kinds = parseAllDocuments(out).map((d) => (d.toJS() as Obj).kind);
      expect(kinds).toEqual(expect.arrayContaining(['Deployment', 'Service', 'ServiceMonitor', 'NetworkPolicy']));
      if (dir.includes('overlays')) expect(kinds).toContain('EnvoyFilter');
    }
  });

  it('every way of starting meshcap passes V8 the same start-up flag (shebang, Dockerfile, npm start, benchmarks)', () => {
    // V8 reads --initial-old-space-size at start-up only, so it lives where node is launched.
    const flag = '--initial-old-space-size=64';
    const read = (f: string) => fs.readFileSync(path.join(repoRoot, f), 'utf8');
    expect(read('bin/meshcap.js').split('\n')[0]).toBe(`#!/usr/bin/env -S node ${flag}`);
    expect(read('Dockerfile')).toMatch(new RegExp(`^ENTRYPOINT \\["/nodejs/bin/node", "${flag}", "/app/bin/meshcap.js"\\]$`, 'm'));
    expect((JSON.parse(read('package.json')) as { scripts: Record<string, string> }).scripts.start).toBe(`node ${flag} bin/meshcap.js serve`);
    expect(read('bench/lib/procs.ts')).toContain(`DEPLOYED_NODE_FLAGS = ['${flag}']`);
  });

  it('the Dockerfile is multi-stage (node:20-bookworm-slim + npm ci) and ships only dist, proto, bin and production node_modules as user 65532', () => {
    const df = fs.readFileSync(path.join(repoRoot, 'Dockerfile'), 'utf8');
    const froms = [...df.matchAll(/^FROM\s+(\S+)(?:\s+AS\s+(\S+))?/gim)].map((m) => m[1]);
    expect(froms.length).toBeGreaterThanOrEqual(2);
    expect(froms[0]).toBe('node:20-bookworm-slim');
    expect(df).toMatch(/RUN npm ci\b/);
    expect(df).toMatch(/npm ci --omit=dev/);
    const runtime = df.slice(df.lastIndexOf('\nFROM '));
    const copies = [...runtime.matchAll(/^COPY\s+(?:--\S+\s+)*(\S+)\s+(\S+)$/gm)].map((m) => m[1]);
    expect(copies).toEqual(expect.arrayContaining(['/src/node_modules', '/src/dist/src', 'bin', 'proto', 'package.json']));
    expect(copies.every((s) => ['/src/node_modules', '/src/dist/src', 'bin', 'proto', 'package.json', '/out/captures', '/out/run/meshcap'].includes(s!))).toBe(true);
    expect(runtime).toMatch(/^USER 65532(:65532)?$/m);
    expect(runtime).not.toMatch(/^RUN /m);
    const ignore = fs.readFileSync(path.join(repoRoot, '.dockerignore'), 'utf8').split('\n');
    expect(ignore).toEqual(expect.arrayContaining(['node_modules', 'dist', 'test', '.git']));
  });
});

function hasKubectl(): boolean {
  try {
    execFileSync('kubectl', ['version', '--client'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
