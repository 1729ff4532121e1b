/**
 * Protobuf text format (what Envoy writes for PROTO_TEXT file sinks and what its tests and docs
 * use), parsed against protobufjs reflection types into plain objects for `Type.fromObject`, and
 * from there to binary, so that every door into meshcap ends at the one binary decoder.
 *
 * Supported: nested messages (`f {`, `f: {`, `<...>`), repeated fields (repeated lines or
 * `f: [a, b]`), maps (`f { key: .. value: .. }`), C-style string escapes, integers in decimal,
 * hex and octal (64-bit ones are returned as decimal strings), floats incl. inf/nan, bools, enums
 * by name or number, `#` comments, `,`/`;` separators. Not supported: extensions and Any
 * expansion (`[type.googleapis.com/...]`). Errors name the line.
 */
import protobuf from 'protobufjs';
import { loadSchema, traceWrapperType } from './proto-schema.js';

type Obj = Record<string, unknown>;

interface Token {
  kind: 'ident' | 'number' | 'string' | 'sym' | 'eof';
  /** Identifier/number text, the symbol, or a string literal's body without its quotes. */
  text: string;
  line: number;
}

const IDENT = /[A-Za-z_][A-Za-z0-9_]*/y;
// A number-like token: digits/letters/dots, plus a signed exponent (`1e-5`). Validated later.
const NUMBER = /(?:\d|\.\d)(?:[eE][+-]\d|[\w.])*/y;

class Lexer {
  private pos = 0;
  private ahead: Token | null = null;

  constructor(
    private readonly src: string,
    private line: number,
  ) {}

  peek(): Token {
    return (this.ahead ??= this.scan());
  }

  next(): Token {
    const t = this.peek();
    this.ahead = null;
    return t;
  }

  /** Consumes the next token if it is the symbol `s`. */
  eat(s: string): boolean {
    const t = this.peek();
    if (t.kind !== 'sym' || t.text !== s) return false;
    this.ahead = null;
    return true;
  }

  private scan(): Token {
    const s = this.src;
    while (this.pos < s.length) {
      const c = s.charCodeAt(this.pos);
      if (c === 0x0a) {
        this.line++;
        this.pos++;
      } else if (c === 0x20 || c === 0x09 || c === 0x0d || c === 0x0b || c === 0x0c) {
        this.pos++;
      } else if (c === 0x23 /* # */) {
        const nl = s.indexOf('\n', this.pos);
        this.pos = nl < 0 ? s.length : nl;
      } else {
        break;
      }
    }
    const line = this.line;
    if (this.pos >= s.length) return { kind: 'eof', text: '', line };
    const c = s[this.pos]!;
    if (c === '"' || c === "'") {
      let i = this.pos + 1;
      for (;;) {
        const d = s[i];
        if (d === undefined || d === '\n') throw textError(line, 'unterminated string literal');
        if (d === c) break;
        i += d === '\\' ? 2 : 1;
      }
      const text = s.slice(this.pos + 1, i);
      this.pos = i + 1;
      return { kind: 'string', text, line };
    }
    IDENT.lastIndex = this.pos;
    NUMBER.lastIndex = this.pos;
    const m = IDENT.exec(s);
    const n = m ? null : NUMBER.exec(s);
    if (m || n) {
      const text = (m ?? n)![0];
      this.pos += text.length;
      return { kind: m ? 'ident' : 'number', text, line };
    }
    this.pos++;
    return { kind: 'sym', text: c, line };
  }
}

function textError(line: number, msg: string): Error {
  return new Error(`textproto line ${line}: ${msg}`);
}

function describe(t: Token): string {
  if (t.kind === 'eof') return 'end of input';
  if (t.kind === 'string') return 'a string';
  return `"${t.text}"`;
}

function typeName(t: protobuf.ReflectionObject): string {
  return t.fullName.replace(/^\./, '');
}

/**
 * The field named `name`. protobufjs' bundled google/protobuf types (Struct's Value) have
 * camelCase field names whatever keepCase says, so `string_value` falls back to `stringValue`.
 * hasOwn: `fields` is a plain object, and "constructor" must not match.
 */
function lookupField(type: protobuf.Type, name: string): protobuf.Field | undefined {
  if (Object.hasOwn(type.fields, name)) return type.fields[name];
  const camel = protobuf.util.camelCase(name);
  return camel !== name && Object.hasOwn(type.fields, camel) ? type.fields[camel] : undefined;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Decodes the body of a string literal (C escapes) to bytes; other characters as UTF-8. */
function unescapeBytes(body: string, line: number): Buffer {
  if (!body.includes('\\')) return Buffer.from(body, 'utf8');
  // Escapes never produce more bytes than their source characters; a UTF-16 unit is <= 3 bytes.
  const out = Buffer.allocUnsafe(body.length * 3);
  let o = 0;
  let i = 0;
  while (i < body.length) {
    const bs = body.indexOf('\\', i);
    const stop = bs < 0 ? body.length : bs;
    if (stop > i) o += out.write(body.slice(i, stop), o, 'utf8');
    if (bs < 0) break;
    i = bs + 1;
    const c = body[i++]!;
    const simple = SIMPLE_ESCAPES[c];
    if (simple !== undefined) {
      out[o++] = simple;
    } else if (c >= '0' && c <= '7') {
      // Up to three octal digits (\0, \12, \377).
      let v = c.charCodeAt(0) - 48;
      for (let k = 0; k < 2 && i < body.length && body[i]! >= '0' && body[i]! <= '7'; k++) v = v * 8 + body.charCodeAt(i++) - 48;
      if (v > 255) throw textError(line, `octal escape \\${v.toString(8)} is out of range`);
      out[o++] = v;
    } else if (c === 'x' || c === 'X') {
      // One or two hex digits.
      const m = /^[0-9a-fA-F]{1,2}/.exec(body.slice(i, i + 2));
      if (!m) throw textError(line, 'invalid \\x escape');
      out[o++] = parseInt(m[0], 16);
      i += m[0].length;
    } else if (c === 'u' || c === 'U') {
      const n = c === 'u' ? 4 : 8;
      const hex = body.slice(i, i + n);
      if (!/^[0-9a-fA-F]+$/.test(hex) || hex.length !== n) throw textError(line, `invalid \\${c} escape`);
      i += n;
      let cp = parseInt(hex, 16);
      // A surrogate pair written as two \u escapes is one code point.
      const low = /^\\u([dD][c-fC-F][0-9a-fA-F]{2})/.exec(body.slice(i, i + 6));
      if (cp >= 0xd800 && cp <= 0xdbff && low) {
        cp = 0x10000 + ((cp - 0xd800) << 10) + (parseInt(low[1]!, 16) - 0xdc00);
        i += 6;
      }
      if (cp > 0x10ffff) throw textError(line, `\\${c}${hex} is not a Unicode code point`);
      o += out.write(String.fromCodePoint(cp), o, 'utf8');
    } else {
      throw textError(line, `unknown escape \\${c}`);
    }
  }
  return out.subarray(0, o);
}

const SIMPLE_ESCAPES: Record<string, number> = {
  a: 0x07, b: 0x08, f: 0x0c, n: 0x0a, r: 0x0d, t: 0x09, v: 0x0b,
  '\\': 0x5c, "'": 0x27, '"': 0x22, '?': 0x3f,
};

const I32: [bigint, bigint] = [-(2n ** 31n), 2n ** 31n - 1n];
const U32: [bigint, bigint] = [0n, 2n ** 32n - 1n];
const I64: [bigint, bigint] = [-(2n ** 63n), 2n ** 63n - 1n];
const U64: [bigint, bigint] = [0n, 2n ** 64n - 1n];
const INT_RANGES: Record<string, [bigint, bigint]> = {
  int32: I32, sint32: I32, sfixed32: I32,
  uint32: U32, fixed32: U32,
  int64: I64, sint64: I64, sfixed64: I64,
  uint64: U64, fixed64: U64,
};

class Parser {
  constructor(readonly lx: Lexer) {}

  /** Fields up to the symbol `close` (consumed), or to the end of input when close is null. */
  parseBody(type: protobuf.Type, close: string | null): Obj {
    const obj: Obj = {};
    for (;;) {
      const t = this.lx.peek();
      if (t.kind === 'sym' && (t.text === ';' || t.text === ',')) {
        this.lx.next();
      } else if (close !== null && t.kind === 'sym' && t.text === close) {
        this.lx.next();
        return obj;
      } else if (t.kind === 'eof') {
        if (close === null) return obj;
        throw textError(t.line, `expected "${close}" to close ${typeName(type)}, got end of input`);
      } else {
        this.parseField(type, obj);
      }
    }
  }

  /** One `name: value` / `name { ... }` / `name: [ ... ]` into obj. */
  parseField(type: protobuf.Type, obj: Obj): void {
    const t = this.lx.next();
    if (t.kind === 'sym' && t.text === '[') throw textError(t.line, 'extensions and Any expansion ([...]) are not supported');
    if (t.kind !== 'ident') throw textError(t.line, `expected a field name, got ${describe(t)}`);
    const field = lookupField(type, t.text);
    if (!field) throw textError(t.line, `unknown field "${t.text}" in ${typeName(type)}`);
    field.resolve();
    const isMessage = field.map || field.resolvedType instanceof protobuf.Type;
    // The colon is optional before a message value and required before a scalar.
    if (!this.lx.eat(':') && !isMessage) throw textError(this.lx.peek().line, `expected ":" after field "${t.text}"`);
    if ((field.repeated || field.map) && this.lx.eat('[')) {
      if (this.lx.eat(']')) return;
      do this.store(obj, field, this.parseValue(field), t);
      while (this.lx.eat(','));
      const end = this.lx.next();
      if (end.kind !== 'sym' || end.text !== ']') throw textError(end.line, `expected "]" or ",", got ${describe(end)}`);
      return;
    }
    this.store(obj, field, this.parseValue(field), t);
  }

  private store(obj: Obj, field: protobuf.Field, value: unknown, t: Token): void {
    const name = field.name;
    if (field.map) {
      const [k, v] = value as [string, unknown];
      ((obj[name] ??= {}) as Obj)[k] = v;
    } else if (field.repeated) {
      ((obj[name] ??= []) as unknown[]).push(value);
    } else {
      if (Object.hasOwn(obj, name)) throw textError(t.line, `field "${name}" is specified more than once`);
      const other = field.partOf?.fieldsArray.find((f) => f !== field && Object.hasOwn(obj, f.name));
      if (other) throw textError(t.line, `field "${name}" and field "${other.name}" are members of the same oneof "${field.partOf!.name}"`);
      obj[name] = value;
    }
  }

  private parseValue(field: protobuf.Field): unknown {
    if (field.map) return this.parseMapEntry(field as unknown as protobuf.MapField);
    if (field.resolvedType instanceof protobuf.Type) return this.parseMessage(field.resolvedType);
    return this.parseScalar(field.type, field.resolvedType, field.name);
  }

  private parseMessage(type: protobuf.Type): Obj {
    const open = this.lx.next();
    if (open.kind === 'sym' && open.text === '{') return this.parseBody(type, '}');
    if (open.kind === 'sym' && open.text === '<') return this.parseBody(type, '>');
    throw textError(open.line, `expected "{" to start ${typeName(type)}, got ${describe(open)}`);
  }

  /** `{ key: K value: V }` → [K as an object key, V]. */
  private parseMapEntry(field: protobuf.MapField): [string, unknown] {
    const open = this.lx.next();
    const close = open.text === '{' ? '}' : open.text === '<' ? '>' : null;
    if (open.kind !== 'sym' || close === null) throw textError(open.line, `expected "{" to start a "${field.name}" entry, got ${describe(open)}`);
    let key: unknown = field.keyType === 'string' ? '' : field.keyType === 'bool' ? false : '0';
    let value: unknown;
    while (!this.lx.eat(close)) {
      if (this.lx.eat(';') || this.lx.eat(',')) continue;
      const t = this.lx.next();
      const valueIsMessage = t.text === 'value' && field.resolvedType instanceof protobuf.Type;
      if (t.kind !== 'ident' || (t.text !== 'key' && t.text !== 'value')) throw textError(t.line, `expected "key" or "value" in a "${field.name}" entry, got ${describe(t)}`);
      if (!this.lx.eat(':') && !valueIsMessage) throw textError(this.lx.peek().line, `expected ":" after "${t.text}"`);
      if (t.text === 'key') key = this.parseScalar(field.keyType, null, 'key');
      else value = valueIsMessage ? this.parseMessage(field.resolvedType as protobuf.Type) : this.parseScalar(field.type, field.resolvedType, 'value');
    }
    // An absent value is the type's default.
    if (value === undefined) value = field.resolvedType instanceof protobuf.Type ? {} : field.resolvedType ? 0 : (protobuf.types.defaults as Record<string, unknown>)[field.type];
    return [String(key), value];
  }

  private parseScalar(type: string, resolved: protobuf.Type | protobuf.Enum | null, name: string): unknown {
    const t = this.lx.peek();
    if (resolved instanceof protobuf.Enum) {
      if (t.kind === 'ident') {
        this.lx.next();
        const v = Object.hasOwn(resolved.values, t.text) ? resolved.values[t.text] : undefined;
        if (v === undefined) throw textError(t.line, `unknown value "${t.text}" for enum ${typeName(resolved)} (field "${name}")`);
        return v;
      }
      return Number(this.parseInteger(I32, name));
    }
    switch (type) {
      case 'string':
      case 'bytes': {
        const bytes = this.parseStringBytes(name);
        if (type === 'bytes') return bytes;
        try {
          return utf8.decode(bytes);
        } catch {
          throw textError(t.line, `field "${name}": string is not valid UTF-8 (use a bytes field)`);
        }
      }
      case 'bool': {
        const b = this.lx.next();
        if (['true', 'True', 't', '1'].includes(b.text) && b.kind !== 'string') return true;
        if (['false', 'False', 'f', '0'].includes(b.text) && b.kind !== 'string') return false;
        throw textError(b.line, `field "${name}": expected true or false, got ${describe(b)}`);
      }
      case 'float':
      case 'double':
        return this.parseFloat(name);
      default: {
        const range = INT_RANGES[type];
        if (!range) throw textError(t.line, `field "${name}": unsupported type ${type}`);
        const v = this.parseInteger(range, name);
        // 64-bit values stay exact as decimal strings; fromObject accepts them.
        return range === I64 || range === U64 ? v.toString() : Number(v);
      }
    }
  }

  private parseStringBytes(name: string): Buffer {
    const first = this.lx.next();
    if (first.kind !== 'string') throw textError(first.line, `field "${name}": expected a string, got ${describe(first)}`);
    const parts = [unescapeBytes(first.text, first.line)];
    // Adjacent literals concatenate, as in C.
    while (this.lx.peek().kind === 'string') {
      const t = this.lx.next();
      parts.push(unescapeBytes(t.text, t.line));
    }
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }

  private parseInteger([min, max]: [bigint, bigint], name: string): bigint {
    const neg = this.lx.eat('-');
    const t = this.lx.next();
    const m = t.kind === 'number' ? /^(?:0[xX]([0-9a-fA-F]+)|0([0-7]*)|([1-9][0-9]*))$/.exec(t.text) : null;
    if (!m) throw textError(t.line, `field "${name}": expected an integer, got ${describe(t)}`);
    let v = m[1] !== undefined ? BigInt('0x' + m[1]) : m[2] !== undefined ? BigInt('0o' + (m[2] || '0')) : BigInt(m[3]!);
    if (neg) v = -v;
    if (v < min || v > max) throw textError(t.line, `field "${name}": ${neg ? '-' : ''}${t.text} is out of range`);
    return v;
  }

  private parseFloat(name: string): number {
    const neg = this.lx.eat('-');
    const t = this.lx.next();
    let v: number;
    const lower = t.text.toLowerCase();
    if (t.kind === 'ident' && (lower === 'inf' || lower === 'infinity')) v = Infinity;
    else if (t.kind === 'ident' && lower === 'nan') v = NaN;
    else if (t.kind === 'number' && /^(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[fF]?$/.test(t.text)) v = Number(t.text.replace(/[fF]$/, ''));
    else if (t.kind === 'number' && /^0[xX][0-9a-fA-F]+$/.test(t.text)) v = Number(t.text);
    else throw textError(t.line, `field "${name}": expected a number, got ${describe(t)}`);
    return neg ? -v : v;
  }
}

/** Parses one message of `type` in text format into an object for `type.fromObject`. */
export function parseTextProto(text: string, type: protobuf.Type): Record<string, unknown> {
  return parseAt(text, 1, type);
}

function parseAt(text: string, firstLine: number, type: protobuf.Type): Obj {
  return new Parser(new Lexer(text, firstLine)).parseBody(type, null);
}

/** The text between lines that are exactly `---`, with the line number each part starts on. */
function splitParts(text: string): { body: string; line: number }[] {
  const parts: { body: string; line: number }[] = [];
  const re = /^---[ \t]*\r?$/gm;
  let start = 0;
  let line = 1;
  for (let m = re.exec(text); m; m = re.exec(text)) {
    parts.push({ body: text.slice(start, m.index), line });
    for (let i = start; i < m.index; i++) if (text.charCodeAt(i) === 0x0a) line++;
    // The next part starts with the newline that ends the `---` line, which the lexer counts.
    start = m.index + m[0].length;
  }
  parts.push({ body: text.slice(start), line });
  return parts;
}

function encode(type: protobuf.Type, obj: Obj): Buffer {
  const u8 = type.encode(type.fromObject(obj)).finish();
  return Buffer.isBuffer(u8) ? u8 : Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength);
}

/**
 * Text-format TraceWrappers → binary TraceWrapper messages. Parts are separated by `---` lines
 * (our fixtures); within a part, messages may simply follow each other (Envoy's PROTO_TEXT file
 * sink appends one per trace): TraceWrapper is a single oneof, so each top-level field is a new one.
 */
export function parseTextTraces(text: string): Buffer[] {
  const type = traceWrapperType();
  const out: Buffer[] = [];
  for (const part of splitParts(text)) {
    const parser = new Parser(new Lexer(part.body, part.line));
    for (;;) {
      while (parser.lx.eat(';') || parser.lx.eat(','));
      if (parser.lx.peek().kind === 'eof') break;
      const obj: Obj = {};
      parser.parseField(type, obj);
      out.push(encode(type, obj));
    }
  }
  return out;
}

/** Text-format `envoy.service.tap.v3.StreamTapsRequest`s separated by `---` lines → binary. */
export function parseTextStreamTapsRequests(text: string): Buffer[] {
  const type = loadSchema().lookupType('envoy.service.tap.v3.StreamTapsRequest');
  const out: Buffer[] = [];
  for (const part of splitParts(text)) {
    if (new Lexer(part.body, part.line).peek().kind === 'eof') continue; // blank or comments only
    out.push(encode(type, parseAt(part.body, part.line, type)));
  }
  return out;
}
