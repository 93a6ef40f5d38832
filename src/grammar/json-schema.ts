/**
 * JSON and JSON Schema → GBNF (llama.cpp's grammar format) for constrained sampling.
 *
 * - `JSON_VALUE_GBNF` / `JSON_OBJECT_GBNF`: any JSON value / any JSON object (OpenAI's
 *   `response_format: { type: 'json_object' }`). `buildJsonGbnf()` makes variants with bounded
 *   depth, string lengths and container sizes.
 * - `jsonSchemaToGbnf(schema)`: a grammar whose every output is a JSON text that validates against
 *   `schema` (`response_format: { type: 'json_schema' }`).
 *
 * Principles:
 * - Sound before complete: every string the grammar produces must validate against the schema (as
 *   standard validators — ajv, Python jsonschema, pydantic — understand it); the grammar may produce a
 *   subset of the valid documents (for example, numbers have at most 16 integer digits, strings use
 *   one spelling per character). A keyword that cannot be honoured is refused with an
 *   InvalidOptionError instead of being ignored.
 * - Bounded whitespace: at most one space, or a newline plus 20 indentation characters, between
 *   tokens, and none before or after the root value, so that sampling always makes progress and a
 *   finished document can only be followed by end-of-generation.
 * - Deterministic output: rule names derive from the schema path (property names, `item`, `alt-N`,
 *   `def-Name` for `$defs`), sanitised to [a-zA-Z0-9-]; collisions get a `-2`, `-3`… suffix.
 *
 * Choices:
 * - `additionalProperties` absent means NO extra properties are generated when `properties` is
 *   declared (like llama.cpp, and as OpenAI's strict mode requires anyway); an object schema without
 *   `properties` stays open. `true` or a schema allows extra keys, which can never spell a
 *   declared property name. Required properties, in declared order, interleave with optional ones,
 *   which may each be left out; extra properties come last.
 * - `oneOf` is treated like `anyOf`: the grammar cannot enforce that exactly one alternative matches.
 * - `allOf` is merged (properties, required, bounds, types, enums; `additionalProperties: false` of a
 *   component removes the properties it does not declare, as the spec says).
 * - `format` only for date, time, date-time and uuid (dates respect month lengths and leap years);
 *   other formats are refused. `pattern` supports a regular-expression subset (see RegexParser).
 * - Limits of llama.cpp's grammar engine: it decodes byte-fallback tokens without rejecting overlong
 *   UTF-8 (C0 AF is read as "/"), so a model that emits such bytes can get invalid UTF-8 past any
 *   grammar; the runtime then shows U+FFFD. Trained models practically never do this.
 */
import { InvalidOptionError } from '../errors.js';

export const DEFAULT_SCHEMA_OPTION = 'response_format.json_schema';

/** llama.cpp turns `{m,n}` with n above this into an unbounded repetition, and refuses m above it. */
const MAX_REPETITION = 2000;
/** Integer parts (and fraction parts) are at most this many digits. */
const MAX_DIGITS = 16;

// ---------------------------------------------------------------------------------------------
// GBNF text helpers
// ---------------------------------------------------------------------------------------------

function hex(cp: number, width: number): string {
  return cp.toString(16).toUpperCase().padStart(width, '0');
}

/** A GBNF string literal matching exactly `text`. */
export function gbnfLiteral(text: string): string {
  let out = '"';
  for (const ch of text) {
    const cp = ch.codePointAt(0)!;
    if (ch === '\\') out += '\\\\';
    else if (ch === '"') out += '\\"';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (cp < 0x20 || cp === 0x7f) out += `\\x${hex(cp, 2)}`;
    else if (cp >= 0xd800 && cp <= 0xdfff) out += `\\u${hex(cp, 4)}`;
    else out += ch;
  }
  return `${out}"`;
}

function classChar(cp: number): string {
  if (cp === 0x5d) return '\\]';
  if (cp === 0x5c) return '\\\\';
  if (cp === 0x2d) return '\\-';
  if (cp === 0x22) return '\\"';
  if (cp === 0x5e) return '\\x5E';
  if (cp >= 0x20 && cp < 0x7f) return String.fromCharCode(cp);
  if (cp <= 0xff) return `\\x${hex(cp, 2)}`;
  if (cp <= 0xffff) return `\\u${hex(cp, 4)}`;
  return `\\U${hex(cp, 8)}`;
}

type Range = readonly [number, number];

/** `[...]` for non-empty sorted, disjoint ranges. */
function gbnfClass(ranges: readonly Range[]): string {
  let out = '[';
  for (const [lo, hi] of ranges) {
    out += classChar(lo);
    if (hi > lo) out += (hi > lo + 1 ? '-' : '') + classChar(hi);
  }
  return `${out}]`;
}

/** Is `expr` one GBNF symbol (a rule name, literal, class or parenthesised group)? */
function isSymbol(expr: string): boolean {
  if (/^[a-zA-Z0-9-]+$/.test(expr)) return true;
  if (/^"(?:[^"\\]|\\.)*"$/.test(expr)) return true;
  if (/^\[(?:[^\]\\]|\\.)*\]$/.test(expr)) return true;
  if (expr.startsWith('(') && expr.endsWith(')')) {
    // Balanced from the first to the last character?
    let depth = 0;
    let inLit = false;
    let inClass = false;
    for (let i = 0; i < expr.length; i++) {
      const c = expr[i];
      if (c === '\\') {
        i++;
        continue;
      }
      if (inLit) {
        if (c === '"') inLit = false;
      } else if (inClass) {
        if (c === ']') inClass = false;
      } else if (c === '"') inLit = true;
      else if (c === '[') inClass = true;
      else if (c === '(') depth++;
      else if (c === ')') {
        depth--;
        if (depth === 0 && i !== expr.length - 1) return false;
      }
    }
    return depth === 0;
  }
  return false;
}

function group(expr: string): string {
  return isSymbol(expr) ? expr : `( ${expr} )`;
}

/**
 * `symbol` repeated min..max times (max may be Infinity); '' when max is 0. `symbol` must be one
 * GBNF symbol. Counts above llama.cpp's repetition limit are split into nested chunks, because
 * llama.cpp would otherwise silently drop the upper bound.
 */
function repeat(symbol: string, min: number, max: number): string {
  if (max === 0 || min > max) return '';
  if (min > MAX_REPETITION) {
    const rest = repeat(symbol, min - MAX_REPETITION, max - MAX_REPETITION);
    return `${symbol}{${MAX_REPETITION}} ${group(rest)}`;
  }
  if (max === Infinity) {
    if (min === 0) return `${symbol}*`;
    if (min === 1) return `${symbol}+`;
    return `${symbol}{${min},}`;
  }
  if (max <= MAX_REPETITION) {
    if (min === max) return min === 1 ? symbol : `${symbol}{${min}}`;
    if (min === 0 && max === 1) return `${symbol}?`;
    return `${symbol}{${min},${max}}`;
  }
  // min <= MAX_REPETITION < max < Infinity
  const big = `${symbol}{${MAX_REPETITION}} ${group(repeat(symbol, 0, max - MAX_REPETITION))}`;
  if (min === MAX_REPETITION) return big;
  return `( ${repeat(symbol, min, MAX_REPETITION - 1)} | ${big} )`;
}

function seq(...parts: string[]): string {
  return parts.filter((p) => p.length > 0).join(' ');
}

// ---------------------------------------------------------------------------------------------
// Primitive rules
// ---------------------------------------------------------------------------------------------

const HEX = '[0-9a-fA-F]';
/** Unicode scalar values a JSON string may hold unescaped (no `"`, `\\`, controls or surrogates). */
const RAW_SCALARS: Range[] = [[0x20, 0x21], [0x23, 0x5b], [0x5d, 0xd7ff], [0xe000, 0x10ffff]];
const RAW_CHAR_CLASS = gbnfClass(RAW_SCALARS);

/** `ranges` without the code points `points`. */
function withoutPoints(ranges: readonly Range[], points: readonly number[]): Range[] {
  let out: Range[] = [...ranges];
  for (const cp of points) {
    out = out.flatMap(([lo, hi]): Range[] => {
      if (cp < lo || cp > hi) return [[lo, hi]];
      const parts: Range[] = [];
      if (cp > lo) parts.push([lo, cp - 1]);
      if (cp < hi) parts.push([cp + 1, hi]);
      return parts;
    });
  }
  return out;
}

interface Primitive {
  body: string;
  deps: string[];
}

const PRIMITIVES: Record<string, Primitive> = {
  ws: { body: String.raw`| " " | "\n" [ \t]{0,20}`, deps: [] },
  // One character of a JSON string: any Unicode scalar value but `"`, `\` and control characters,
  // or an escape. The class lists positive ranges (not `[^"\\\x00-\x1F]`) because llama.cpp's
  // grammar decodes byte-fallback tokens leniently: an invalid lead byte such as 0xFA followed by
  // three continuation bytes counts as one "code point" above U+10FFFF, which a negated class
  // would accept and a UTF-8 decoder turns into four U+FFFD. \u escapes exclude surrogates so
  // that one `char` is always exactly one code point (minLength/maxLength).
  char: {
    body: `${RAW_CHAR_CLASS} | "\\\\" ( ["\\\\/bfnrt] | "u" ( [0-9a-cA-CeEfF] ${HEX}{3} | [dD] [0-7] ${HEX}{2} ) )`,
    deps: [],
  },
  // Key characters of additional properties: one spelling per character (no \u, no \/), so that
  // "is not a declared name" can be decided on the spelling.
  'key-char': { body: `${RAW_CHAR_CLASS} | "\\\\" ["\\\\bfnrt]`, deps: [] },
  string: { body: String.raw`"\"" char* "\""`, deps: ['char'] },
  'integral-part': { body: `"0" | [1-9] [0-9]{0,${MAX_DIGITS - 1}}`, deps: [] },
  integer: { body: `"-"? integral-part`, deps: ['integral-part'] },
  number: {
    body: `"-"? integral-part ( "." [0-9]{1,${MAX_DIGITS}} )? ( [eE] [-+]? [0-9]{1,2} )?`,
    deps: ['integral-part'],
  },
  'fraction-any': { body: `( "." [0-9]{1,${MAX_DIGITS}} )?`, deps: [] },
  'fraction-zero': { body: `( "." [0]{1,${MAX_DIGITS}} )?`, deps: [] },
  'fraction-nonzero': { body: `"." [0]{0,${MAX_DIGITS - 1}} [1-9] [0-9]{0,${MAX_DIGITS - 1}}`, deps: [] },
  boolean: { body: `"true" | "false"`, deps: [] },
  null: { body: `"null"`, deps: [] },
  value: { body: 'object | array | string | number | boolean | null', deps: ['object', 'array', 'string', 'number', 'boolean', 'null'] },
  object: {
    body: String.raw`"{" ws ( string ws ":" ws value ( "," ws string ws ":" ws value )* ws )? "}"`,
    deps: ['ws', 'string', 'value'],
  },
  array: { body: String.raw`"[" ws ( value ( "," ws value )* ws )? "]"`, deps: ['ws', 'value'] },
  'day-31': { body: `"0" [1-9] | [12] [0-9] | "3" [01]`, deps: [] },
  'day-30': { body: `"0" [1-9] | [12] [0-9] | "30"`, deps: [] },
  'day-28': { body: `"0" [1-9] | "1" [0-9] | "2" [0-8]`, deps: [] },
  'leap-year': { body: `[0-9]{2} ( "0" [48] | [2468] [048] | [13579] [26] ) | ( [02468] [048] | [13579] [26] ) "00"`, deps: [] },
  // RFC 3339 full-date with real month lengths; 29 February only in leap years.
  date: {
    body: `[0-9]{4} "-" ( ( "0" [13578] | "1" [02] ) "-" day-31 | ( "0" [469] | "11" ) "-" day-30 | "02-" day-28 ) | leap-year "-02-29"`,
    deps: ['day-31', 'day-30', 'day-28', 'leap-year'],
  },
  // RFC 3339 full-time (time zone required), without leap seconds.
  time: {
    body: `( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,6} )? ( "Z" | [-+] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )`,
    deps: [],
  },
  'date-time': { body: `date "T" time`, deps: ['date', 'time'] },
  uuid: { body: `${HEX}{8} "-" ${HEX}{4} "-" ${HEX}{4} "-" ${HEX}{4} "-" ${HEX}{12}`, deps: [] },
  'date-string': { body: String.raw`"\"" date "\""`, deps: ['date'] },
  'time-string': { body: String.raw`"\"" time "\""`, deps: ['time'] },
  'date-time-string': { body: String.raw`"\"" date-time "\""`, deps: ['date-time'] },
  'uuid-string': { body: String.raw`"\"" uuid "\""`, deps: ['uuid'] },
};

const STRING_FORMATS = new Set(['date', 'time', 'date-time', 'uuid']);

// ---------------------------------------------------------------------------------------------
// Any-JSON grammars
// ---------------------------------------------------------------------------------------------

export interface JsonGrammarOptions {
  /** What the root is: any value (default), an object or an array. */
  root?: 'value' | 'object' | 'array';
  /** Most nested containers (the root container counts 1). Default: unbounded. */
  maxDepth?: number;
  /** Most characters in a string (keys included). Default: unbounded. */
  maxStringLength?: number;
  /** Most elements in an array. Default: unbounded. */
  maxItems?: number;
  /** Most members in an object. Default: unbounded. */
  maxProperties?: number;
}

function checkBound(name: string, v: unknown, min: number): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min) {
    throw new InvalidOptionError(name, `an integer >= ${min}`, v);
  }
  return v;
}

function formatRules(rules: Map<string, string>): string {
  const names = [...rules.keys()].filter((n) => n !== 'root').sort();
  return ['root', ...names].map((n) => `${n} ::= ${rules.get(n)!}`).join('\n') + '\n';
}

function addPrimitive(rules: Map<string, string>, name: string): string {
  if (rules.has(name)) return name;
  const prim = PRIMITIVES[name];
  if (!prim) throw new Error(`unknown primitive rule ${name}`);
  rules.set(name, prim.body);
  for (const dep of prim.deps) addPrimitive(rules, dep);
  return name;
}

/**
 * A grammar for any JSON value (or object, or array), optionally with bounded depth and sizes so
 * that a sampler has to close it within a predictable number of characters.
 */
export function buildJsonGbnf(options: JsonGrammarOptions = {}): string {
  const root = options.root ?? 'value';
  if (root !== 'value' && root !== 'object' && root !== 'array') {
    throw new InvalidOptionError('root', "'value', 'object' or 'array'", root);
  }
  const maxDepth = checkBound('maxDepth', options.maxDepth, root === 'value' ? 0 : 1);
  const maxString = checkBound('maxStringLength', options.maxStringLength, 0);
  const maxItems = checkBound('maxItems', options.maxItems, 0);
  const maxProps = checkBound('maxProperties', options.maxProperties, 0);
  const rules = new Map<string, string>();
  if (maxDepth === undefined && maxString === undefined && maxItems === undefined && maxProps === undefined) {
    rules.set('root', addPrimitive(rules, root));
    return formatRules(rules);
  }
  for (const p of ['ws', 'number', 'boolean', 'null']) addPrimitive(rules, p);
  if (maxString === undefined) addPrimitive(rules, 'string');
  else {
    addPrimitive(rules, 'char');
    rules.set('string', seq('"\\""', repeat('char', 0, maxString), '"\\""'));
  }
  const members = (value: string): string => {
    if (maxProps === 0) return String.raw`"{" ws "}"`;
    const member = `string ws ":" ws ${value}`;
    const more = repeat(`( "," ws ${member} )`, 0, maxProps === undefined ? Infinity : maxProps - 1);
    return String.raw`"{" ws ( ${seq(member, more)} ws )? "}"`;
  };
  const elements = (value: string): string => {
    if (maxItems === 0) return String.raw`"[" ws "]"`;
    const more = repeat(`( "," ws ${value} )`, 0, maxItems === undefined ? Infinity : maxItems - 1);
    return String.raw`"[" ws ( ${seq(value, more)} ws )? "]"`;
  };
  const scalars = 'string | number | boolean | null';
  if (maxDepth === undefined) {
    rules.set('value', `object | array | ${scalars}`);
    rules.set('object', members('value'));
    rules.set('array', elements('value'));
    rules.set('root', root);
  } else {
    rules.set('value-0', scalars);
    for (let d = 1; d <= maxDepth; d++) {
      rules.set(`object-${d}`, members(`value-${d - 1}`));
      rules.set(`array-${d}`, elements(`value-${d - 1}`));
      rules.set(`value-${d}`, `object-${d} | array-${d} | ${scalars}`);
    }
    rules.set('root', root === 'value' ? `value-${maxDepth}` : `${root}-${maxDepth}`);
  }
  return formatRules(rules);
}

/** Root: any JSON value (unbounded nesting and sizes; whitespace bounded between tokens). */
export const JSON_VALUE_GBNF: string = buildJsonGbnf({ root: 'value' });
/** Root: any JSON object — `response_format: { type: 'json_object' }`. */
export const JSON_OBJECT_GBNF: string = buildJsonGbnf({ root: 'object' });

// ---------------------------------------------------------------------------------------------
// Code point sets (for `pattern`)
// ---------------------------------------------------------------------------------------------

/** Patterns only produce Basic Multilingual Plane characters (no surrogates): see patternRule. */
const BMP_MAX = 0xffff;

function normalize(ranges: Range[]): Range[] {
  const sorted = ranges.filter(([lo, hi]) => lo <= hi).sort((a, b) => a[0] - b[0]);
  const out: Array<[number, number]> = [];
  for (const [lo, hi] of sorted) {
    const last = out[out.length - 1];
    if (last && lo <= last[1] + 1) last[1] = Math.max(last[1], hi);
    else out.push([lo, hi]);
  }
  return out;
}

function complement(ranges: readonly Range[]): Range[] {
  const out: Range[] = [];
  let next = 0;
  for (const [lo, hi] of ranges) {
    if (lo > next) out.push([next, lo - 1]);
    next = hi + 1;
  }
  if (next <= BMP_MAX) out.push([next, BMP_MAX]);
  return out;
}

function intersect(a: readonly Range[], b: readonly Range[]): Range[] {
  return complement(normalize([...complement(a), ...complement(b)]));
}

function hasChar(ranges: readonly Range[], cp: number): boolean {
  return ranges.some(([lo, hi]) => lo <= cp && cp <= hi);
}

const DIGIT: Range[] = [[0x30, 0x39]];
const WORD: Range[] = normalize([[0x30, 0x39], [0x41, 0x5a], [0x5f, 0x5f], [0x61, 0x7a]]);
// ECMAScript \s without U+FEFF, which Python's and Rust's \s do not include.
const SPACE: Range[] = normalize([
  [0x09, 0x0d], [0x20, 0x20], [0xa0, 0xa0], [0x1680, 0x1680], [0x2000, 0x200a],
  [0x2028, 0x2029], [0x202f, 0x202f], [0x205f, 0x205f], [0x3000, 0x3000],
]);
const ASCII: Range[] = [[0, 0x7f]];
// `.`: anything but line terminators (ECMAScript; Python and Rust exclude only \n).
const DOT: Range[] = complement(normalize([[0x0a, 0x0a], [0x0d, 0x0d], [0x2028, 0x2029]]));
// Characters a JSON string may hold unescaped, within the BMP and without surrogates.
const RAW: Range[] = normalize([[0x20, 0x21], [0x23, 0x5b], [0x5d, 0xd7ff], [0xe000, 0xffff]]);
const SHORT_ESCAPES: Array<[number, string]> = [
  [0x22, '"'], [0x5c, '\\'], [0x08, 'b'], [0x0c, 'f'], [0x0a, 'n'], [0x0d, 'r'], [0x09, 't'],
];

/** GBNF for one character of `set`, spelled as inside a JSON string; null if none can be. */
function setToGbnf(set: readonly Range[]): string | null {
  const alts: string[] = [];
  const raw = intersect(set, RAW);
  if (raw.length === 1 && raw[0]![0] === raw[0]![1]) alts.push(gbnfLiteral(String.fromCharCode(raw[0]![0])));
  else if (raw.length > 0) alts.push(gbnfClass(raw));
  const letters = SHORT_ESCAPES.filter(([cp]) => hasChar(set, cp)).map(([, l]) => l);
  if (letters.length === 1) alts.push(gbnfLiteral(`\\${letters[0]!}`));
  else if (letters.length > 1) alts.push(`"\\\\" [${letters.map((l) => classChar(l.charCodeAt(0))).join('')}]`);
  if (alts.length === 0) return null;
  return alts.length === 1 ? alts[0]! : `( ${alts.join(' | ')} )`;
}

// ---------------------------------------------------------------------------------------------
// Regular expressions (subset) → GBNF
// ---------------------------------------------------------------------------------------------

type RegexNode =
  | { k: 'set'; set: Range[] }
  | { k: 'seq'; items: RegexNode[] }
  | { k: 'alt'; alts: RegexNode[] }
  | { k: 'rep'; node: RegexNode; min: number; max: number }
  | { k: 'bol' }
  | { k: 'eol' };

class PatternError extends Error {
  constructor(
    message: string,
    readonly invalid = false,
  ) {
    super(message);
  }
}

/**
 * Parses the supported subset of ECMAScript regular expressions: literals, `.`, classes `[...]`
 * (ranges, negation, \d \w \s \D \W \S), escapes (\t \n \r \f \v \0 \xHH \uHHHH, escaped
 * punctuation), groups `( )` `(?: )` `(?<name> )`, alternation, quantifiers `* + ? {n} {n,} {n,m}`
 * (lazy or not) and the anchors `^` / `$` at the start / end of a top-level alternative.
 * Refused: lookarounds, backreferences, \b \B, \p{...}, \cX, characters outside the BMP.
 */
class RegexParser {
  private i = 0;
  constructor(private readonly src: string) {}

  parse(): RegexNode {
    const node = this.alternation();
    if (this.i < this.src.length) throw new PatternError(`unbalanced ")" at offset ${this.i}`, true);
    return node;
  }

  private peek(): string | undefined {
    return this.src[this.i];
  }

  private alternation(): RegexNode {
    const alts = [this.sequence()];
    while (this.peek() === '|') {
      this.i++;
      alts.push(this.sequence());
    }
    return alts.length === 1 ? alts[0]! : { k: 'alt', alts };
  }

  private sequence(): RegexNode {
    const items: RegexNode[] = [];
    while (this.i < this.src.length && this.peek() !== '|' && this.peek() !== ')') {
      let atom = this.atom();
      const q = this.quantifier();
      if (q) {
        if (atom.k === 'bol' || atom.k === 'eol') throw new PatternError('a quantifier after an anchor', true);
        atom = { k: 'rep', node: atom, min: q[0], max: q[1] };
      }
      items.push(atom);
    }
    return items.length === 1 ? items[0]! : { k: 'seq', items };
  }

  private quantifier(): [number, number] | undefined {
    const c = this.peek();
    let q: [number, number] | undefined;
    if (c === '*') q = [0, Infinity];
    else if (c === '+') q = [1, Infinity];
    else if (c === '?') q = [0, 1];
    if (q) this.i++;
    else if (c === '{') {
      const m = /^\{(\d+)(?:(,)(\d*))?\}/.exec(this.src.slice(this.i));
      if (!m) throw new PatternError(`a "{" that is not a quantifier at offset ${this.i}`);
      const min = Number(m[1]);
      const max = m[2] === undefined ? min : m[3] === '' ? Infinity : Number(m[3]);
      if (min > max) throw new PatternError(`quantifier {${min},${max}} out of order`, true);
      this.i += m[0].length;
      q = [min, max];
    }
    if (q && this.peek() === '?') this.i++; // lazy: same language
    const after = this.peek();
    if (q && (after === '*' || after === '+' || after === '?' || after === '{')) {
      throw new PatternError(`nothing to repeat at offset ${this.i}`, true);
    }
    return q;
  }

  private atom(): RegexNode {
    const c = this.src[this.i]!;
    switch (c) {
      case '^':
        this.i++;
        return { k: 'bol' };
      case '$':
        this.i++;
        return { k: 'eol' };
      case '.':
        this.i++;
        return { k: 'set', set: DOT };
      case '(': {
        this.i++;
        if (this.src.startsWith('?:', this.i)) this.i += 2;
        else if (this.peek() === '?') {
          const named = /^\?<([A-Za-z_$][\w$]*)>/.exec(this.src.slice(this.i));
          if (!named) throw new PatternError('lookaround assertions are not supported');
          this.i += named[0].length;
        }
        const inner = this.alternation();
        if (this.peek() !== ')') throw new PatternError('unterminated group', true);
        this.i++;
        return inner;
      }
      case '[':
        return { k: 'set', set: this.characterClass() };
      case '\\': {
        const e = this.escape(false);
        return { k: 'set', set: e };
      }
      case '*':
      case '+':
      case '?':
      case '{':
        throw new PatternError(`nothing to repeat at offset ${this.i}`, true);
      case ')':
      case ']':
      case '}':
        throw new PatternError(`unbalanced "${c}" at offset ${this.i}`, true);
      default: {
        const cp = this.literalChar();
        return { k: 'set', set: [[cp, cp]] };
      }
    }
  }

  /** Reads one literal UTF-16 unit (refusing surrogates, i.e. characters outside the BMP). */
  private literalChar(): number {
    const cp = this.src.charCodeAt(this.i);
    if (cp >= 0xd800 && cp <= 0xdfff) throw new PatternError('characters outside the Basic Multilingual Plane are not supported');
    this.i++;
    return cp;
  }

  /** After a backslash (at this.i). Returns the set it denotes. */
  private escape(inClass: boolean): Range[] {
    this.i++; // backslash
    const c = this.src[this.i];
    if (c === undefined) throw new PatternError('a trailing backslash', true);
    this.i++;
    switch (c) {
      case 'd':
        return DIGIT;
      case 'w':
        return WORD;
      case 's':
        return SPACE;
      // Negated shorthands keep to ASCII: \D in Python or Rust excludes non-ASCII digits too.
      case 'D':
        return intersect(complement(DIGIT), ASCII);
      case 'W':
        return intersect(complement(WORD), ASCII);
      case 'S':
        return intersect(complement(SPACE), ASCII);
      case 't':
        return [[9, 9]];
      case 'n':
        return [[10, 10]];
      case 'v':
        return [[11, 11]];
      case 'f':
        return [[12, 12]];
      case 'r':
        return [[13, 13]];
      case 'b':
        if (inClass) return [[8, 8]];
        throw new PatternError('word boundaries (\\b) are not supported');
      case '0':
        if (/[0-9]/.test(this.peek() ?? '')) throw new PatternError('octal escapes are not supported');
        return [[0, 0]];
      case 'x':
      case 'u': {
        const n = c === 'x' ? 2 : 4;
        const digits = this.src.slice(this.i, this.i + n);
        if (!new RegExp(`^[0-9a-fA-F]{${n}}$`).test(digits)) throw new PatternError(`malformed \\${c} escape`);
        this.i += n;
        const cp = parseInt(digits, 16);
        if (cp >= 0xd800 && cp <= 0xdfff) throw new PatternError('surrogate escapes are not supported');
        return [[cp, cp]];
      }
      default:
        if (/[A-Za-z0-9]/.test(c)) throw new PatternError(`the escape \\${c} is not supported`);
        if (c.charCodeAt(0) >= 0xd800 && c.charCodeAt(0) <= 0xdfff) {
          throw new PatternError('characters outside the Basic Multilingual Plane are not supported');
        }
        return [[c.charCodeAt(0), c.charCodeAt(0)]];
    }
  }

  private characterClass(): Range[] {
    this.i++; // [
    let negate = false;
    if (this.peek() === '^') {
      negate = true;
      this.i++;
    }
    let usesShorthand = false;
    const parts: Range[] = [];
    // One class atom: a single character (returned as a number) or a shorthand set.
    const classAtom = (): number | Range[] => {
      if (this.peek() === '\\') {
        const before = this.i;
        const set = this.escape(true);
        if (/^\\[dwsDWS]$/.test(this.src.slice(before, this.i))) {
          usesShorthand = true;
          return set;
        }
        return set[0]![0];
      }
      return this.literalChar();
    };
    while (this.peek() !== ']') {
      if (this.i >= this.src.length) throw new PatternError('an unterminated character class', true);
      const first = classAtom();
      if (this.peek() === '-' && this.src[this.i + 1] !== ']' && this.src[this.i + 1] !== undefined) {
        this.i++;
        const last = classAtom();
        if (typeof first !== 'number' || typeof last !== 'number') throw new PatternError('a range with a shorthand class');
        if (first > last) throw new PatternError('a character range out of order', true);
        parts.push([first, last]);
      } else if (typeof first === 'number') parts.push([first, first]);
      else parts.push(...first);
    }
    this.i++; // ]
    const set = normalize(parts);
    if (!negate) return set;
    const neg = complement(set);
    return usesShorthand ? intersect(neg, ASCII) : neg;
  }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/** The (sub)schema matches no JSON value that the grammar could produce. */
class Unsatisfiable extends Error {
  constructor(
    readonly path: string,
    readonly reason: string,
  ) {
    super(reason);
  }
}

function pointerSegment(key: string): string {
  return key.replace(/~/g, '~0').replace(/\//g, '~1');
}

function describePath(path: string): string {
  return path === '' ? '#' : `#${path}`;
}

// ---------------------------------------------------------------------------------------------
// Keyword tables
// ---------------------------------------------------------------------------------------------

/** Keywords that do not constrain instances: ignored. Also every `x-…` extension keyword. */
const ANNOTATIONS = new Set([
  'title', 'description', 'default', 'examples', '$comment', '$schema', '$id', '$anchor',
  'deprecated', 'readOnly', 'writeOnly', 'contentMediaType', 'contentEncoding', 'discriminator',
  '$defs', 'definitions',
]);

const SUPPORTED = new Set([
  'type', 'enum', 'const', 'properties', 'required', 'additionalProperties', 'items', 'minItems',
  'maxItems', 'minLength', 'maxLength', 'pattern', 'format', 'minimum', 'maximum',
  'exclusiveMinimum', 'exclusiveMaximum', 'anyOf', 'oneOf', 'allOf', '$ref', 'uniqueItems',
]);

const TYPES = ['object', 'array', 'string', 'number', 'integer', 'boolean', 'null'] as const;
type JsonType = (typeof TYPES)[number];

const OBJECT_KEYWORDS = ['properties', 'required', 'additionalProperties'];
const ARRAY_KEYWORDS = ['items', 'minItems', 'maxItems'];
const STRING_KEYWORDS = ['minLength', 'maxLength', 'pattern', 'format'];
const NUMBER_KEYWORDS = ['minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum'];

type SchemaObject = Record<string, unknown>;

function isObject(v: unknown): v is SchemaObject {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function deepEqual(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (Array.isArray(a)) return Array.isArray(b) && a.length === b.length && a.every((x, i) => deepEqual(x, b[i]));
  if (isObject(a) && isObject(b)) {
    const ka = Object.keys(a);
    return ka.length === Object.keys(b).length && ka.every((k) => Object.hasOwn(b, k) && deepEqual(a[k], b[k]));
  }
  return false;
}

function jsonType(v: unknown): JsonType {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  if (typeof v === 'number') return Number.isInteger(v) ? 'integer' : 'number';
  return typeof v as JsonType;
}

function typeAllows(types: readonly JsonType[], v: unknown): boolean {
  const t = jsonType(v);
  return types.includes(t) || (t === 'integer' && types.includes('number'));
}

function sanitize(name: string): string {
  const s = name.replace(/[^a-zA-Z0-9-]+/g, '-').replace(/^-+|-+$/g, '');
  return s.length > 0 ? s : 'x';
}

// ---------------------------------------------------------------------------------------------
// Integer and number ranges
// ---------------------------------------------------------------------------------------------

function digitClass(lo: number, hi: number): string {
  return lo === hi ? `[${lo}]` : `[${lo}-${hi}]`;
}

function anyDigits(n: number): string {
  return n === 0 ? '' : n === 1 ? '[0-9]' : `[0-9]{${n}}`;
}

/** Decimal strings a..b of equal length (a <= b), as a GBNF sequence. */
function sameLengthRange(a: string, b: string): string {
  if (a === b) return gbnfLiteral(a);
  let i = 0;
  while (a[i] === b[i]) i++;
  const prefix = i > 0 ? gbnfLiteral(a.slice(0, i)) : '';
  const da = Number(a[i]);
  const db = Number(b[i]);
  const restLen = a.length - i - 1;
  if (restLen === 0) return seq(prefix, digitClass(da, db));
  const aRest = a.slice(i + 1);
  const bRest = b.slice(i + 1);
  const alts: string[] = [];
  let lo = da;
  let hi = db;
  if (!/^0+$/.test(aRest)) {
    alts.push(seq(`[${da}]`, group(sameLengthRange(aRest, '9'.repeat(restLen)))));
    lo = da + 1;
  }
  const bAllNines = /^9+$/.test(bRest);
  if (!bAllNines) hi = db - 1;
  if (lo <= hi) alts.push(seq(digitClass(lo, hi), anyDigits(restLen)));
  if (!bAllNines) alts.push(seq(`[${db}]`, group(sameLengthRange('0'.repeat(restLen), bRest))));
  const body = alts.length === 1 ? alts[0]! : `( ${alts.join(' | ')} )`;
  return seq(prefix, body);
}

/** Non-negative integers lo..hi (hi null: up to MAX_DIGITS digits), without leading zeros. */
function nonNegativeRange(lo: number, hi: number | null): string[] {
  const loS = String(lo);
  const maxLen = hi === null ? Math.max(MAX_DIGITS, loS.length) : String(hi).length;
  const alts: string[] = [];
  for (let len = loS.length; len <= maxLen; len++) {
    const from = len === loS.length ? loS : `1${'0'.repeat(len - 1)}`;
    if (hi === null && len > loS.length) {
      // All longer numbers at once.
      alts.push(seq('[1-9]', `[0-9]{${len - 1},${maxLen - 1}}`));
      break;
    }
    const to = hi !== null && len === maxLen ? String(hi) : '9'.repeat(len);
    alts.push(sameLengthRange(from, to));
  }
  return alts;
}

function alternatives(alts: string[]): string {
  return alts.length === 1 ? alts[0]! : alts.map((a) => group(a)).join(' | ');
}

/** Integers in [lo, hi] (null: unbounded on that side, up to MAX_DIGITS digits); null if none. */
function integerRange(lo: number | null, hi: number | null): string | null {
  const alts: string[] = [];
  if (lo === null || lo < 0) {
    // Negative numbers -m with m in [max(1, -hi), -lo].
    const mLo = hi !== null && hi < 0 ? -hi : 1;
    const mHi = lo === null ? null : -lo;
    if (mHi === null || mLo <= mHi) alts.push(`"-" ${group(alternatives(nonNegativeRange(mLo, mHi)))}`);
  }
  if (hi === null || hi >= 0) {
    const nLo = lo === null ? 0 : Math.max(lo, 0);
    if (hi === null || nLo <= hi) alts.push(...nonNegativeRange(nLo, hi));
  }
  return alts.length === 0 ? null : alternatives(alts);
}

/**
 * Non-negative decimals x (integer part I, fraction F, no exponent) with L <(=) x <(=) U, L and U
 * integers (U null: unbounded). Parts are joined with the fraction rules.
 */
function nonNegativeDecimalRange(L: number, lExcl: boolean, U: number | null, uExcl: boolean, prim: (n: string) => string): string[] {
  const parts: string[] = [];
  const anyLo = lExcl ? L + 1 : L;
  const anyHi = U === null ? null : U - 1;
  if (anyHi === null || anyLo <= anyHi) parts.push(`${group(alternatives(nonNegativeRange(anyLo, anyHi)))} ${prim('fraction-any')}`);
  if (lExcl && (U === null || U > L)) parts.push(`${gbnfLiteral(String(L))} ${prim('fraction-nonzero')}`);
  if (U !== null && !uExcl && (U > L || (U === L && !lExcl)) && !(lExcl && U === L)) {
    parts.push(`${gbnfLiteral(String(U))} ${prim('fraction-zero')}`);
  }
  return parts;
}

// ---------------------------------------------------------------------------------------------
// The converter
// ---------------------------------------------------------------------------------------------

interface Ctx {
  /** The $ref (pointer) whose rule we are at the left edge of; undefined once a character was consumed. */
  owner: string | undefined;
  /** $refs inlined by allOf merges since the last consumed character (a repeat would never end). */
  inlined: readonly string[];
}

interface Member {
  kv: string;
  required: boolean;
  repeat: boolean;
}

interface State {
  rules: Map<string, string>;
  taken: Set<string>;
  refNames: Map<string, string>;
  edges: Map<string, Set<string>>;
}

class Converter {
  private rules = new Map<string, string>();
  private taken = new Set<string>(['root', ...Object.keys(PRIMITIVES)]);
  private refNames = new Map<string, string>();
  private edges = new Map<string, Set<string>>();
  private readonly paths = new WeakMap<object, string>();
  private inProgress = new Set<object>();

  constructor(
    private readonly document: unknown,
    private readonly option: string,
    private readonly label: string,
  ) {
    this.index(document, '', new Set());
  }

  convert(): string {
    this.refNames.set('#', 'root');
    try {
      const name = this.visit(this.document, '', 'root', { owner: '#', inlined: [] }, 'root');
      if (name !== 'root') this.rules.set('root', name);
    } catch (error) {
      if (error instanceof Unsatisfiable) {
        throw this.error(`the schema at ${describePath(error.path)} matches no value: ${error.reason}`, 'a satisfiable JSON schema');
      }
      throw error;
    }
    this.checkLeftRecursion();
    return formatRules(this.rules);
  }

  // -- bookkeeping ---------------------------------------------------------------------------

  private index(node: unknown, path: string, seen: Set<object>): void {
    if (typeof node !== 'object' || node === null || seen.has(node)) return;
    seen.add(node);
    if (!this.paths.has(node)) this.paths.set(node, path);
    if (Array.isArray(node)) node.forEach((v, i) => this.index(v, `${path}/${i}`, seen));
    else for (const [k, v] of Object.entries(node)) this.index(v, `${path}/${pointerSegment(k)}`, seen);
  }

  private pathOf(schema: unknown, fallback: string): string {
    return (typeof schema === 'object' && schema !== null && this.paths.get(schema)) || fallback;
  }

  private synth(schema: SchemaObject, path: string): SchemaObject {
    this.paths.set(schema, path);
    return schema;
  }

  private error(message: string, expected = 'a JSON schema using supported keywords', received?: unknown): InvalidOptionError {
    const where = this.label ? ` (schema "${this.label}")` : '';
    return new InvalidOptionError(this.option, expected, received, `invalid option ${this.option}${where}: ${message}`);
  }

  private unsupported(path: string, keyword: string, detail?: string, received?: unknown): InvalidOptionError {
    const at = describePath(`${path}/${pointerSegment(keyword)}`);
    return this.error(`JSON schema keyword "${keyword}" at ${at} is not supported${detail ? `: ${detail}` : ''}`, undefined, received);
  }

  private invalid(path: string, keyword: string, expected: string, received: unknown): InvalidOptionError {
    const at = describePath(`${path}/${pointerSegment(keyword)}`);
    return this.error(`JSON schema keyword "${keyword}" at ${at} must be ${expected}`, expected, received);
  }

  private allocate(hint: string): string {
    const base = sanitize(hint);
    let name = base;
    for (let n = 2; this.taken.has(name); n++) name = `${base}-${n}`;
    this.taken.add(name);
    return name;
  }

  private define(name: string, body: string): string {
    this.rules.set(name, body);
    return name;
  }

  /** Defines a rule for `body` (under `forced` or a name from `hint`); a bare rule name is reused. */
  private finish(hint: string, forced: string | undefined, body: string): string {
    if (forced !== undefined) return this.define(forced, body);
    if (/^[a-zA-Z0-9-]+$/.test(body) && this.rules.has(body)) return body;
    return this.define(this.allocate(hint), body);
  }

  private prim(name: string): string {
    return addPrimitive(this.rules, name);
  }

  private snapshot(): State {
    return {
      rules: new Map(this.rules),
      taken: new Set(this.taken),
      refNames: new Map(this.refNames),
      edges: new Map([...this.edges].map(([k, v]) => [k, new Set(v)])),
    };
  }

  private restore(s: State): void {
    this.rules = s.rules;
    this.taken = s.taken;
    this.refNames = s.refNames;
    this.edges = s.edges;
  }

  // -- keyword checks ------------------------------------------------------------------------

  /** Throws for unsupported keywords and malformed values; returns the constraint keywords. */
  private constraints(schema: SchemaObject, path: string): SchemaObject {
    const out: SchemaObject = {};
    for (const [key, value] of Object.entries(schema)) {
      if (key === '$id' && path !== '') throw this.unsupported(path, key, 'only the root schema may have an $id');
      if (ANNOTATIONS.has(key) || key.startsWith('x-')) continue;
      if (!SUPPORTED.has(key)) throw this.unsupported(path, key, undefined, value);
      this.checkValue(path, key, value);
      if (key === 'uniqueItems') continue; // only `false` passes checkValue
      out[key] = value;
    }
    return out;
  }

  private checkValue(path: string, key: string, value: unknown): void {
    const isSchema = (v: unknown) => typeof v === 'boolean' || isObject(v);
    switch (key) {
      case 'type': {
        const list = Array.isArray(value) ? value : [value];
        if (list.length === 0 || !list.every((t) => (TYPES as readonly unknown[]).includes(t))) {
          throw this.invalid(path, key, `one of ${TYPES.join(', ')} or an array of them`, value);
        }
        return;
      }
      case 'enum':
        if (!Array.isArray(value)) throw this.invalid(path, key, 'an array', value);
        return;
      case 'properties':
        if (!isObject(value) || !Object.values(value).every(isSchema)) throw this.invalid(path, key, 'an object of schemas', value);
        return;
      case 'required':
        if (!Array.isArray(value) || !value.every((v) => typeof v === 'string')) throw this.invalid(path, key, 'an array of strings', value);
        return;
      case 'additionalProperties':
        if (!isSchema(value)) throw this.invalid(path, key, 'a boolean or a schema', value);
        return;
      case 'items':
        if (Array.isArray(value)) throw this.unsupported(path, key, 'the array (tuple) form is not supported', value);
        if (!isSchema(value)) throw this.invalid(path, key, 'a schema', value);
        return;
      case 'minItems':
      case 'maxItems':
      case 'minLength':
      case 'maxLength':
        if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) throw this.invalid(path, key, 'a non-negative integer', value);
        return;
      case 'pattern':
      case 'format':
      case '$ref':
        if (typeof value !== 'string') throw this.invalid(path, key, 'a string', value);
        return;
      case 'minimum':
      case 'maximum':
        if (typeof value !== 'number' || !Number.isFinite(value)) throw this.invalid(path, key, 'a number', value);
        return;
      case 'exclusiveMinimum':
      case 'exclusiveMaximum':
        if (typeof value !== 'boolean' && (typeof value !== 'number' || !Number.isFinite(value))) {
          throw this.invalid(path, key, 'a number (or, in draft 4, a boolean)', value);
        }
        return;
      case 'anyOf':
      case 'oneOf':
      case 'allOf':
        if (!Array.isArray(value) || value.length === 0 || !value.every(isSchema)) throw this.invalid(path, key, 'a non-empty array of schemas', value);
        return;
      case 'uniqueItems':
        if (value === true) throw this.unsupported(path, key, 'uniqueItems: true cannot be enforced by a grammar', value);
        if (value !== false) throw this.invalid(path, key, 'a boolean', value);
        return;
    }
  }

  // -- $ref ----------------------------------------------------------------------------------

  private resolve(ref: string, path: string): { target: unknown; pointer: string } {
    if (!ref.startsWith('#')) throw this.unsupported(path, '$ref', `only local references ("#/...") are supported, got "${ref}"`, ref);
    let fragment: string;
    try {
      fragment = decodeURIComponent(ref.slice(1));
    } catch {
      throw this.invalid(path, '$ref', 'a valid URI fragment', ref);
    }
    if (fragment !== '' && !fragment.startsWith('/')) {
      throw this.unsupported(path, '$ref', `only JSON-pointer references are supported (anchors are not), got "${ref}"`, ref);
    }
    let target: unknown = this.document;
    const segments = fragment === '' ? [] : fragment.slice(1).split('/').map((s) => s.replace(/~1/g, '/').replace(/~0/g, '~'));
    for (const seg of segments) {
      if (Array.isArray(target) && /^(0|[1-9][0-9]*)$/.test(seg)) target = target[Number(seg)];
      else if (isObject(target) && Object.hasOwn(target, seg)) target = target[seg];
      else target = undefined;
      if (target === undefined) throw this.error(`$ref "${ref}" at ${describePath(`${path}/$ref`)} does not resolve`, 'a $ref to a schema in the document', ref);
    }
    if (typeof target !== 'boolean' && !isObject(target)) {
      throw this.error(`$ref "${ref}" at ${describePath(`${path}/$ref`)} does not point to a schema`, 'a $ref to a schema in the document', ref);
    }
    const pointer = `#${segments.map(pointerSegment).map((s) => `/${s}`).join('')}`;
    return { target, pointer };
  }

  private refRule(ref: string, path: string, ctx: Ctx): string {
    const { target, pointer } = this.resolve(ref, path);
    if (ctx.owner !== undefined) {
      let set = this.edges.get(ctx.owner);
      if (!set) this.edges.set(ctx.owner, (set = new Set()));
      set.add(pointer);
    }
    const known = this.refNames.get(pointer);
    if (known !== undefined) return known;
    const m = /^#\/(?:\$defs|definitions)\/([^/]+)$/.exec(pointer);
    const name = this.allocate(m ? `def-${m[1]!}` : `ref-${pointer.slice(1)}`);
    this.refNames.set(pointer, name);
    // A fresh circular-object guard: recursion through $ref is bounded by refNames.
    const outer = this.inProgress;
    this.inProgress = new Set();
    try {
      const inner = this.visit(target, pointer.slice(1), name, { owner: pointer, inlined: [] }, name);
      if (inner !== name) this.define(name, inner);
    } finally {
      this.inProgress = outer;
    }
    return name;
  }

  private checkLeftRecursion(): void {
    const state = new Map<string, 1 | 2>();
    const stack: string[] = [];
    const dfs = (node: string): void => {
      state.set(node, 1);
      stack.push(node);
      for (const next of this.edges.get(node) ?? []) {
        const s = state.get(next);
        if (s === 1) {
          const cycle = [...stack.slice(stack.indexOf(next)), next].join(' -> ');
          throw this.error(`$ref cycle ${cycle} is left-recursive (it can repeat without producing any character)`, 'a JSON schema without left-recursive $ref cycles');
        }
        if (s === undefined) dfs(next);
      }
      stack.pop();
      state.set(node, 2);
    };
    for (const node of this.edges.keys()) if (!state.has(node)) dfs(node);
  }

  // -- visiting ------------------------------------------------------------------------------

  private childHint(hint: string, seg: string): string {
    return hint === 'root' ? seg : `${hint}-${seg}`;
  }

  /** Returns the name of a rule for `schema` (defined under `forced` when given). */
  private visit(schema: unknown, fallbackPath: string, hint: string, ctx: Ctx, forced?: string): string {
    const path = this.pathOf(schema, fallbackPath);
    if (schema === true) return this.finish(hint, forced, this.prim('value'));
    if (schema === false) throw new Unsatisfiable(path, 'the schema is false');
    if (!isObject(schema)) throw this.error(`the schema at ${describePath(path)} must be an object or a boolean`, 'a JSON schema (object or boolean)', schema);
    if (this.inProgress.has(schema)) throw this.error(`the schema at ${describePath(path)} contains itself (a circular object); use $ref`, 'a JSON schema');
    this.inProgress.add(schema);
    try {
      return this.visitObject(schema, path, hint, ctx, forced);
    } finally {
      this.inProgress.delete(schema);
    }
  }

  private visitObject(schema: SchemaObject, path: string, hint: string, ctx: Ctx, forced: string | undefined): string {
    const c = this.constraints(schema, path);
    const keys = Object.keys(c);
    if (keys.length === 0) return this.finish(hint, forced, this.prim('value'));

    if ('$ref' in c) {
      if (keys.length > 1) {
        const { $ref, ...rest } = c;
        const merged = this.synth({ allOf: [this.synth({ $ref }, path), this.synth(rest, path)] }, path);
        return this.visit(merged, path, hint, ctx, forced);
      }
      const name = this.refRule(c.$ref as string, path, ctx);
      return forced !== undefined ? this.define(forced, name) : name;
    }

    if ('allOf' in c) {
      const { allOf, ...rest } = c;
      const components = [...(allOf as unknown[]).map((s, i) => ({ s, p: `${path}/allOf/${i}` })), { s: rest, p: path }];
      const { schema: merged, inlined } = this.merge(components, path, ctx);
      return this.visit(merged, path, hint, { owner: ctx.owner, inlined: [...ctx.inlined, ...inlined] }, forced);
    }

    if ('anyOf' in c || 'oneOf' in c) {
      if ('anyOf' in c && 'oneOf' in c) throw this.unsupported(path, 'oneOf', 'anyOf and oneOf in the same schema');
      const kw = 'anyOf' in c ? 'anyOf' : 'oneOf';
      const { [kw]: alts, ...rest } = c;
      const hasRest = Object.keys(rest).length > 0;
      const names: string[] = [];
      let lastFailure: Unsatisfiable | undefined;
      (alts as unknown[]).forEach((alt, i) => {
        const altPath = `${path}/${kw}/${i}`;
        // Sibling keywords apply to every alternative (their properties come first).
        const altSchema = hasRest ? this.synth({ allOf: [this.synth(rest, path), alt] }, altPath) : alt;
        const saved = this.snapshot();
        try {
          const altHint = hint === 'root' ? `alt-${i}` : `${hint}-${i}`;
          const name = this.visit(altSchema, altPath, altHint, ctx);
          if (!names.includes(name)) names.push(name);
        } catch (error) {
          if (!(error instanceof Unsatisfiable)) throw error;
          this.restore(saved);
          lastFailure = error;
        }
      });
      if (names.length === 0) throw new Unsatisfiable(path, `no ${kw} alternative can match (${lastFailure?.reason ?? ''})`);
      return this.finish(hint, forced, names.join(' | '));
    }

    if ('enum' in c || 'const' in c) return this.finish(hint, forced, this.enumBody(c, path));

    let types: JsonType[];
    if ('type' in c) {
      const list = (Array.isArray(c.type) ? c.type : [c.type]) as JsonType[];
      types = [...new Set(list)];
      if (types.includes('number')) types = types.filter((t) => t !== 'integer');
    } else {
      types = [];
      if (OBJECT_KEYWORDS.some((k) => k in c)) types.push('object');
      if (ARRAY_KEYWORDS.some((k) => k in c)) types.push('array');
      if (STRING_KEYWORDS.some((k) => k in c)) types.push('string');
      if (NUMBER_KEYWORDS.some((k) => k in c)) types.push('number');
      if (types.length === 0) return this.finish(hint, forced, this.prim('value'));
    }
    const parts: string[] = [];
    let lastFailure: Unsatisfiable | undefined;
    for (const type of types) {
      const saved = types.length > 1 ? this.snapshot() : undefined;
      try {
        parts.push(this.typeBody(type, c, path, hint, types.length > 1));
      } catch (error) {
        if (!(error instanceof Unsatisfiable) || !saved) throw error;
        this.restore(saved);
        lastFailure = error;
      }
    }
    if (parts.length === 0) throw lastFailure ?? new Unsatisfiable(path, 'no type can match');
    return this.finish(hint, forced, parts.length === 1 ? parts[0]! : parts.map(group).join(' | '));
  }

  private enumBody(c: SchemaObject, path: string): string {
    for (const key of Object.keys(c)) {
      if (key !== 'enum' && key !== 'const' && key !== 'type') throw this.unsupported(path, key, 'only "type" may accompany enum/const');
    }
    let values: unknown[] = 'enum' in c ? (c.enum as unknown[]) : [c.const];
    if ('enum' in c && 'const' in c) values = values.filter((v) => deepEqual(v, c.const));
    if ('type' in c) {
      const types = (Array.isArray(c.type) ? c.type : [c.type]) as JsonType[];
      values = values.filter((v) => typeAllows(types, v));
    }
    const literals = [...new Set(values.map((v) => gbnfLiteral(JSON.stringify(v))))];
    if (literals.length === 0) throw new Unsatisfiable(path, 'no enum/const value satisfies the other keywords');
    return literals.join(' | ');
  }

  private typeBody(type: JsonType, c: SchemaObject, path: string, hint: string, several: boolean): string {
    switch (type) {
      case 'object':
        return this.objectBody(c, path, hint);
      case 'array':
        return this.arrayBody(c, path, hint);
      case 'string':
        return this.stringBody(c, path, several ? this.childHint(hint, 'string') : hint);
      case 'integer':
        return this.integerBody(c, path);
      case 'number':
        return this.numberBody(c, path);
      case 'boolean':
        return this.prim('boolean');
      case 'null':
        return this.prim('null');
    }
  }

  // -- objects -------------------------------------------------------------------------------

  private objectBody(c: SchemaObject, path: string, hint: string): string {
    const ws = this.prim('ws');
    const props = (c.properties ?? {}) as SchemaObject;
    const required = new Set((c.required ?? []) as string[]);
    // Closed by default only when properties are declared: a bare {type: 'object'} is any object.
    const ap = c.additionalProperties ?? (c.properties === undefined ? true : undefined);
    const apIsAny = ap === true || (isObject(ap) && Object.keys(ap).length === 0);
    if (apIsAny && c.properties === undefined && required.size === 0) return this.prim('object');
    const inner: Ctx = { owner: undefined, inlined: [] };
    const members: Member[] = [];
    const names = Object.keys(props);

    const kvRule = (key: string, keyHint: string, value: string): string =>
      this.define(this.allocate(`${keyHint}-kv`), `${gbnfLiteral(JSON.stringify(key))} ${ws} ":" ${ws} ${value}`);

    for (const key of names) {
      const propHint = this.childHint(hint, sanitize(key));
      const saved = required.has(key) ? undefined : this.snapshot();
      try {
        const value = this.visit(props[key], `${path}/properties/${pointerSegment(key)}`, propHint, inner);
        members.push({ kv: kvRule(key, propHint, value), required: required.has(key), repeat: false });
      } catch (error) {
        // An optional property no value can satisfy is simply never generated.
        if (!(error instanceof Unsatisfiable) || !saved) throw error;
        this.restore(saved);
      }
    }
    for (const key of required) {
      if (Object.hasOwn(props, key)) continue;
      if (ap === false) throw new Unsatisfiable(path, `required property "${key}" is not declared and additionalProperties is false`);
      const propHint = this.childHint(hint, sanitize(key));
      const value = isObject(ap) ? this.visit(ap, `${path}/additionalProperties`, propHint, inner) : this.prim('value');
      members.push({ kv: kvRule(key, propHint, value), required: true, repeat: false });
      names.push(key);
    }
    if (ap === true || isObject(ap)) {
      const extraHint = this.childHint(hint, 'additional');
      const value = ap === true ? this.prim('value') : this.visit(ap, `${path}/additionalProperties`, `${extraHint}-value`, inner);
      const key = names.length === 0 ? this.prim('string') : this.define(this.allocate(`${extraHint}-key`), this.notStrings(names));
      const kv = this.define(this.allocate(`${extraHint}-kv`), `${key} ${ws} ":" ${ws} ${value}`);
      members.push({ kv, required: false, repeat: true });
    }
    if (members.length === 0) return `"{" ${ws} "}"`;

    const item = (m: Member): string =>
      m.repeat ? `( "," ${ws} ${m.kv} )*` : m.required ? `"," ${ws} ${m.kv}` : `( "," ${ws} ${m.kv} )?`;
    const first = (m: Member): string => (m.repeat ? `${m.kv} ( "," ${ws} ${m.kv} )*` : m.kv);
    const n = members.length;
    const firstRequired = members.findIndex((m) => m.required);
    const lastFirst = firstRequired < 0 ? n - 1 : firstRequired; // candidates for the first member
    let body: string;
    if (lastFirst === 0) {
      body = seq(first(members[0]!), ...members.slice(1).map(item));
    } else {
      // Several members can come first (all earlier ones optional and absent); the rest of the
      // list after member j is shared through `-rest-j` rules.
      const restRules = new Map<number, string>();
      const rest = (j: number): string => {
        if (j >= n) return '';
        const known = restRules.get(j);
        if (known !== undefined) return known;
        const tail = rest(j + 1);
        const name = this.define(this.allocate(`${hint === 'root' ? '' : `${hint}-`}rest-${j}`), seq(item(members[j]!), tail));
        restRules.set(j, name);
        return name;
      };
      const alts: string[] = [];
      for (let k = 0; k <= lastFirst; k++) alts.push(seq(first(members[k]!), rest(k + 1)));
      body = alts.length === 1 ? alts[0]! : `( ${alts.join(' | ')} )`;
    }
    return firstRequired < 0 ? `"{" ${ws} ( ${body} ${ws} )? "}"` : `"{" ${ws} ${body} ${ws} "}"`;
  }

  /** A JSON string (with quotes) whose value is none of `names` (keys of additional properties). */
  private notStrings(names: string[]): string {
    interface Node {
      children: Map<number, Node>;
      end: boolean;
    }
    const root: Node = { children: new Map(), end: false };
    for (const name of names) {
      let node = root;
      for (const ch of name) {
        const cp = ch.codePointAt(0)!;
        let next = node.children.get(cp);
        if (!next) node.children.set(cp, (next = { children: new Map(), end: false }));
        node = next;
      }
      node.end = true;
    }
    const keyChar = this.prim('key-char');
    const escLetter = new Map<number, string>(SHORT_ESCAPES.map(([cp, l]) => [cp, l]));
    const spell = (cp: number): string | null => {
      const l = escLetter.get(cp);
      if (l !== undefined) return gbnfLiteral(`\\${l}`);
      if (cp < 0x20) return null; // key-char cannot produce it: no conflict possible
      return gbnfLiteral(String.fromCodePoint(cp));
    };
    const other = (excluded: number[]): string => {
      const raw = gbnfClass(withoutPoints(RAW_SCALARS, excluded));
      const letters = SHORT_ESCAPES.filter(([cp]) => !excluded.includes(cp)).map(([, l]) => classChar(l.charCodeAt(0)));
      return letters.length > 0 ? `( ${raw} | "\\\\" [${letters.join('')}] )` : raw;
    };
    const visit = (node: Node): string => {
      const alts: string[] = [];
      if (!node.end) alts.push('');
      for (const [cp, child] of node.children) {
        const s = spell(cp);
        if (s !== null) alts.push(`${s} ( ${visit(child)} )`);
      }
      alts.push(`${other([...node.children.keys()])} ${keyChar}*`);
      return alts.join(' | ');
    };
    return `"\\"" ( ${visit(root)} ) "\\""`;
  }

  // -- arrays --------------------------------------------------------------------------------

  private arrayBody(c: SchemaObject, path: string, hint: string): string {
    const ws = this.prim('ws');
    const minItems = (c.minItems as number | undefined) ?? 0;
    const maxItems = (c.maxItems as number | undefined) ?? Infinity;
    if (minItems > maxItems) throw new Unsatisfiable(path, `minItems ${minItems} > maxItems ${maxItems}`);
    const items = 'items' in c ? c.items : true;
    if (items === false || maxItems === 0) {
      if (minItems > 0) throw new Unsatisfiable(path, 'items is false but minItems > 0');
      return `"[" ${ws} "]"`;
    }
    if ((items === true || (isObject(items) && Object.keys(items).length === 0)) && minItems === 0 && maxItems === Infinity) {
      return this.prim('array');
    }
    const item = this.visit(items, `${path}/items`, this.childHint(hint, 'item'), { owner: undefined, inlined: [] });
    const list = seq(item, repeat(`( "," ${ws} ${item} )`, Math.max(minItems - 1, 0), maxItems - 1));
    return minItems === 0 ? `"[" ${ws} ( ${list} ${ws} )? "]"` : `"[" ${ws} ${list} ${ws} "]"`;
  }

  // -- strings -------------------------------------------------------------------------------

  private stringBody(c: SchemaObject, path: string, hint: string): string {
    const minLength = c.minLength as number | undefined;
    const maxLength = c.maxLength as number | undefined;
    const hasLength = minLength !== undefined || maxLength !== undefined;
    if (c.format !== undefined) {
      const format = c.format as string;
      if (!STRING_FORMATS.has(format)) {
        throw this.unsupported(path, 'format', `format "${format}" (supported: ${[...STRING_FORMATS].join(', ')})`, format);
      }
      if (c.pattern !== undefined) throw this.unsupported(path, 'pattern', 'pattern together with format');
      if (hasLength) throw this.unsupported(path, minLength !== undefined ? 'minLength' : 'maxLength', 'length limits together with format');
      return this.prim(`${format}-string`);
    }
    if (c.pattern !== undefined) {
      if (hasLength) throw this.unsupported(path, minLength !== undefined ? 'minLength' : 'maxLength', 'length limits together with pattern');
      return this.patternBody(c.pattern as string, path, hint);
    }
    if (!hasLength) return this.prim('string');
    const min = minLength ?? 0;
    const max = maxLength ?? Infinity;
    if (min > max) throw new Unsatisfiable(path, `minLength ${min} > maxLength ${max}`);
    const chars = repeat(this.prim('char'), min, max);
    return chars ? `"\\"" ${chars} "\\""` : `"\\"\\""`;
  }

  /**
   * A JSON string matching `pattern` (ECMAScript regular expression, unanchored search as JSON
   * Schema says). Generated characters stay within the BMP and use one spelling each: raw, or a
   * short escape (\" \\ \b \f \n \r \t); other control characters are never generated.
   */
  private patternBody(pattern: string, path: string, hint: string): string {
    let valid = false;
    for (const flags of ['u', '']) {
      try {
        new RegExp(pattern, flags);
        valid = true;
        break;
      } catch {
        // try the next flag set
      }
    }
    if (!valid) throw this.invalid(path, 'pattern', 'a valid regular expression', pattern);
    let ast: RegexNode;
    try {
      ast = new RegexParser(pattern).parse();
    } catch (error) {
      if (!(error instanceof PatternError)) throw error;
      if (error.invalid) throw this.invalid(path, 'pattern', `a valid regular expression (${error.message})`, pattern);
      throw this.unsupported(path, 'pattern', `${error.message} (in ${JSON.stringify(pattern)})`, pattern);
    }
    let sub = 0;
    const subRule = (body: string): string => this.define(this.allocate(`${hint}-re-${++sub}`), body);
    const toGbnf = (node: RegexNode): string | null => {
      switch (node.k) {
        case 'set':
          return setToGbnf(node.set);
        case 'bol':
        case 'eol':
          throw this.unsupported(path, 'pattern', `"^" and "$" are only supported at the start and end of the pattern (in ${JSON.stringify(pattern)})`, pattern);
        case 'seq': {
          const parts: string[] = [];
          for (const item of node.items) {
            const g = toGbnf(item);
            if (g === null) return null;
            if (g !== '') parts.push(g);
          }
          return mergeLiterals(parts).join(' ');
        }
        case 'alt': {
          const alts = node.alts.map(toGbnf).filter((g): g is string => g !== null);
          if (alts.length === 0) return null;
          return `( ${alts.join(' | ')} )`;
        }
        case 'rep': {
          const g = toGbnf(node.node);
          if (g === null) return node.min === 0 ? '' : null;
          if (g === '') return '';
          const symbol = /^[a-zA-Z0-9-]+$/.test(g) || /^"(?:[^"\\]|\\.)*"$/.test(g) || /^\[(?:[^\]\\]|\\.)*\]$/.test(g) ? g : subRule(g);
          return repeat(symbol, node.min, node.max);
        }
      }
    };
    const branches = ast.k === 'alt' ? ast.alts : [ast];
    const char = this.prim('char');
    const out: string[] = [];
    for (const branch of branches) {
      const items = branch.k === 'seq' ? [...branch.items] : [branch];
      let anchoredStart = false;
      let anchoredEnd = false;
      while (items[0]?.k === 'bol') {
        items.shift();
        anchoredStart = true;
      }
      while (items[items.length - 1]?.k === 'eol') {
        items.pop();
        anchoredEnd = true;
      }
      const g = toGbnf({ k: 'seq', items });
      if (g === null) continue;
      out.push(seq(anchoredStart ? '' : `${char}*`, g === '' ? '' : group(g), anchoredEnd ? '' : `${char}*`));
    }
    if (out.length === 0) throw new Unsatisfiable(path, `pattern ${JSON.stringify(pattern)} matches no string the grammar can spell`);
    const content = out.length === 1 ? out[0]! : `( ${out.map((o) => (o === '' ? '' : o)).join(' | ')} )`;
    return seq('"\\""', content, '"\\""');
  }

  // -- numbers -------------------------------------------------------------------------------

  /** Bounds as {lo, loExcl, hi, hiExcl}, draft-4 boolean exclusives included. */
  private bounds(c: SchemaObject): { lo: number | null; loExcl: boolean; hi: number | null; hiExcl: boolean } {
    let lo: number | null = null;
    let loExcl = false;
    let hi: number | null = null;
    let hiExcl = false;
    const tighterLo = (v: number, excl: boolean) => {
      if (lo === null || v > lo || (v === lo && excl)) {
        lo = v;
        loExcl = excl;
      }
    };
    const tighterHi = (v: number, excl: boolean) => {
      if (hi === null || v < hi || (v === hi && excl)) {
        hi = v;
        hiExcl = excl;
      }
    };
    if (typeof c.minimum === 'number') tighterLo(c.minimum, c.exclusiveMinimum === true);
    if (typeof c.maximum === 'number') tighterHi(c.maximum, c.exclusiveMaximum === true);
    if (typeof c.exclusiveMinimum === 'number') tighterLo(c.exclusiveMinimum, true);
    if (typeof c.exclusiveMaximum === 'number') tighterHi(c.exclusiveMaximum, true);
    return { lo, loExcl, hi, hiExcl };
  }

  private checkBoundSize(path: string, c: SchemaObject): void {
    for (const k of NUMBER_KEYWORDS) {
      const v = c[k];
      if (typeof v === 'number' && Math.abs(v) > Number.MAX_SAFE_INTEGER) {
        throw this.unsupported(path, k, `bounds must be at most ${Number.MAX_SAFE_INTEGER} in magnitude`, v);
      }
    }
  }

  private integerBody(c: SchemaObject, path: string): string {
    const { lo, loExcl, hi, hiExcl } = this.bounds(c);
    if (lo === null && hi === null) return this.prim('integer');
    this.checkBoundSize(path, c);
    const iLo = lo === null ? null : loExcl ? Math.floor(lo) + 1 : Math.ceil(lo);
    const iHi = hi === null ? null : hiExcl ? Math.ceil(hi) - 1 : Math.floor(hi);
    if (iLo !== null && iHi !== null && iLo > iHi) throw new Unsatisfiable(path, 'no integer lies within minimum/maximum');
    const body = integerRange(iLo, iHi);
    if (body === null) throw new Unsatisfiable(path, 'no integer lies within minimum/maximum');
    return group(body);
  }

  private numberBody(c: SchemaObject, path: string): string {
    const { lo, loExcl, hi, hiExcl } = this.bounds(c);
    if (lo === null && hi === null) return this.prim('number');
    this.checkBoundSize(path, c);
    for (const k of NUMBER_KEYWORDS) {
      const v = c[k];
      if (typeof v === 'number' && !Number.isInteger(v)) {
        throw this.unsupported(path, k, 'bounds of type "number" must be integers (use type "integer" or integer bounds)', v);
      }
    }
    if (lo !== null && hi !== null && (lo > hi || (lo === hi && (loExcl || hiExcl)))) {
      throw new Unsatisfiable(path, 'no number lies within minimum/maximum');
    }
    const prim = (n: string) => this.prim(n);
    const alts: string[] = [];
    if (lo === null || lo < 0) {
      // Negative numbers -m: m > 0, m >= -hi (when hi < 0), m <= -lo.
      const mLo = hi !== null && hi < 0 ? -hi : 0;
      const mLoExcl = hi !== null && hi < 0 ? hiExcl : true;
      const neg = nonNegativeDecimalRange(mLo, mLoExcl, lo === null ? null : -lo, loExcl, prim);
      if (neg.length > 0) alts.push(`"-" ${group(alternatives(neg))}`);
    }
    if (hi === null || hi >= 0) {
      const pLo = lo === null || lo < 0 ? 0 : lo;
      const pLoExcl = lo === null || lo < 0 ? false : loExcl;
      alts.push(...nonNegativeDecimalRange(pLo, pLoExcl, hi, hiExcl, prim));
    }
    if (alts.length === 0) throw new Unsatisfiable(path, 'no number lies within minimum/maximum');
    return group(alternatives(alts));
  }

  // -- allOf ---------------------------------------------------------------------------------

  /** Merges allOf components (refs inlined) into one schema. */
  private merge(components: Array<{ s: unknown; p: string }>, path: string, ctx: Ctx): { schema: SchemaObject; inlined: string[] } {
    const flat: Array<{ c: SchemaObject; p: string }> = [];
    const inlined: string[] = [];
    const expand = (s: unknown, p: string, stack: string[]): void => {
      if (s === true) return;
      if (s === false) throw new Unsatisfiable(p, 'an allOf component is false');
      if (!isObject(s)) throw this.error(`the schema at ${describePath(p)} must be an object or a boolean`, 'a JSON schema (object or boolean)', s);
      const sp = this.pathOf(s, p);
      const c = this.constraints(s, sp);
      const { $ref, allOf, ...rest } = c;
      if (typeof $ref === 'string') {
        const { target, pointer } = this.resolve($ref, sp);
        if (stack.includes(pointer) || ctx.inlined.includes(pointer)) {
          throw this.unsupported(sp, '$ref', `$ref ${pointer} merged into itself by allOf (left recursion)`);
        }
        inlined.push(pointer);
        expand(target, pointer.slice(1), [...stack, pointer]);
      }
      if (Array.isArray(allOf)) allOf.forEach((a, i) => expand(a, `${sp}/allOf/${i}`, stack));
      if (Object.keys(rest).length > 0) flat.push({ c: rest, p: sp });
    };
    for (const { s, p } of components) expand(s, p, []);
    return { schema: this.mergeExpanded(flat, path), inlined };
  }

  private mergeExpanded(flat: Array<{ c: SchemaObject; p: string }>, path: string): SchemaObject {
    if (flat.length === 0) return this.synth({}, path);
    if (flat.length === 1) return this.synth({ ...flat[0]!.c }, flat[0]!.p);

    const withAlts = flat.filter(({ c }) => 'anyOf' in c || 'oneOf' in c);
    if (withAlts.length > 1) throw this.unsupported(withAlts[1]!.p, 'anyOf' in withAlts[1]!.c ? 'anyOf' : 'oneOf', 'allOf with more than one anyOf/oneOf component');
    if (withAlts.length === 1) {
      const { c: altC, p: altP } = withAlts[0]!;
      const kw = 'anyOf' in altC ? 'anyOf' : 'oneOf';
      const { [kw]: alts, ...own } = altC;
      const base = this.mergeFlat([...flat.filter((f) => f !== withAlts[0]), { c: own, p: altP }], path);
      return this.synth(
        { [kw]: (alts as unknown[]).map((a, i) => this.synth({ allOf: [base, a] }, `${altP}/${kw}/${i}`)) },
        path,
      );
    }
    return this.mergeFlat(flat, path);
  }

  private mergeFlat(flat: Array<{ c: SchemaObject; p: string }>, path: string): SchemaObject {
    const out: SchemaObject = {};
    const all = (k: string) => flat.filter(({ c }) => k in c);
    // type: intersection
    const typed = all('type');
    if (typed.length > 0) {
      let types: JsonType[] | undefined;
      for (const { c } of typed) {
        const list = (Array.isArray(c.type) ? c.type : [c.type]) as JsonType[];
        const expanded = new Set<JsonType>(list.includes('number') ? [...list, 'integer'] : list);
        types = types === undefined ? [...expanded] : types.filter((t) => expanded.has(t));
      }
      if (types!.includes('number')) types = types!.filter((t) => t !== 'integer');
      if (types!.length === 0) throw new Unsatisfiable(path, 'allOf components have no type in common');
      out.type = types;
    }
    // enum / const: intersection
    let values: unknown[] | undefined;
    for (const { c } of flat) {
      for (const list of ['enum' in c ? (c.enum as unknown[]) : undefined, 'const' in c ? [c.const] : undefined]) {
        if (list === undefined) continue;
        values = values === undefined ? [...list] : values.filter((v) => list.some((w) => deepEqual(v, w)));
      }
    }
    if (values !== undefined) {
      if (values.length === 0) throw new Unsatisfiable(path, 'allOf components have no enum/const value in common');
      out.enum = values;
    }
    // properties: a key is allowed only if every component allows it.
    const keys: string[] = [];
    for (const { c } of flat) for (const k of Object.keys((c.properties ?? {}) as SchemaObject)) if (!keys.includes(k)) keys.push(k);
    const required: string[] = [];
    for (const { c } of flat) for (const r of (c.required ?? []) as string[]) if (!required.includes(r)) required.push(r);
    const props: SchemaObject = {};
    for (const k of keys) {
      const parts: unknown[] = [];
      let allowed = true;
      for (const { c } of flat) {
        const cp = c.properties as SchemaObject | undefined;
        if (cp && Object.hasOwn(cp, k)) parts.push(cp[k]);
        else if (c.additionalProperties === false) allowed = false;
        else if (isObject(c.additionalProperties)) parts.push(c.additionalProperties);
      }
      if (!allowed) {
        if (required.includes(k)) throw new Unsatisfiable(path, `required property "${k}" is excluded by additionalProperties: false of another allOf component`);
        continue;
      }
      props[k] = parts.length === 1 ? parts[0] : this.synth({ allOf: parts }, `${path}/properties/${pointerSegment(k)}`);
    }
    if (keys.length > 0) out.properties = props;
    if (required.length > 0) out.required = required;
    const aps = all('additionalProperties').map(({ c }) => c.additionalProperties);
    if (aps.includes(false)) out.additionalProperties = false;
    else {
      const schemas = aps.filter(isObject);
      if (schemas.length === 1) out.additionalProperties = schemas[0];
      else if (schemas.length > 1) out.additionalProperties = this.synth({ allOf: schemas }, `${path}/additionalProperties`);
      else if (aps.includes(true)) out.additionalProperties = true;
    }
    // items: all must hold
    const items = all('items').map(({ c }) => c.items);
    if (items.includes(false)) out.items = false;
    else {
      const schemas = items.filter(isObject);
      if (schemas.length === 1) out.items = schemas[0];
      else if (schemas.length > 1) out.items = this.synth({ allOf: schemas }, `${path}/items`);
    }
    // numeric limits: the tightest
    for (const k of ['minItems', 'minLength']) {
      const v = all(k).map(({ c }) => c[k] as number);
      if (v.length > 0) out[k] = Math.max(...v);
    }
    for (const k of ['maxItems', 'maxLength']) {
      const v = all(k).map(({ c }) => c[k] as number);
      if (v.length > 0) out[k] = Math.min(...v);
    }
    let lo: { v: number; excl: boolean } | undefined;
    let hi: { v: number; excl: boolean } | undefined;
    for (const { c } of flat) {
      const b = this.bounds(c);
      if (b.lo !== null && (lo === undefined || b.lo > lo.v || (b.lo === lo.v && b.loExcl))) lo = { v: b.lo, excl: b.loExcl };
      if (b.hi !== null && (hi === undefined || b.hi < hi.v || (b.hi === hi.v && b.hiExcl))) hi = { v: b.hi, excl: b.hiExcl };
    }
    if (lo) out[lo.excl ? 'exclusiveMinimum' : 'minimum'] = lo.v;
    if (hi) out[hi.excl ? 'exclusiveMaximum' : 'maximum'] = hi.v;
    // pattern / format: only one distinct value
    for (const k of ['pattern', 'format']) {
      const v = [...new Set(all(k).map(({ c }) => c[k]))];
      if (v.length > 1) throw this.unsupported(all(k)[1]!.p, k, `allOf combining different ${k} values`);
      if (v.length === 1) out[k] = v[0];
    }
    return this.synth(out, path);
  }
}

function mergeLiterals(parts: string[]): string[] {
  const out: string[] = [];
  for (const p of parts) {
    const last = out[out.length - 1];
    if (last !== undefined && /^"(?:[^"\\]|\\.)*"$/.test(last) && /^"(?:[^"\\]|\\.)*"$/.test(p)) {
      out[out.length - 1] = last.slice(0, -1) + p.slice(1);
    } else out.push(p);
  }
  return out;
}

export interface JsonSchemaGrammarOptions {
  /** The schema's name (json_schema.name), used in error messages. */
  name?: string;
  /** The option named by InvalidOptionError. Default 'response_format.json_schema'. */
  option?: string;
}

/**
 * Converts a JSON Schema to a GBNF grammar (rule `root`) whose outputs are JSON texts that validate
 * against the schema. `{}` and `true` accept any JSON value. Unsupported keywords, malformed schemas
 * and schemas that match nothing throw InvalidOptionError (option 'response_format.json_schema'),
 * naming the keyword and its JSON pointer.
 */
export function jsonSchemaToGbnf(schema: unknown, options: JsonSchemaGrammarOptions = {}): string {
  const option = options.option ?? DEFAULT_SCHEMA_OPTION;
  if (typeof schema !== 'boolean' && !isObject(schema)) {
    throw new InvalidOptionError(option, 'a JSON schema (object or boolean)', schema);
  }
  return new Converter(schema, option, options.name ?? '').convert();
}
