/**
 * JSON Schema → GBNF. The real check samples from tiny random-weight models with the grammar and
 * validates what comes out: random weights pick arbitrary grammar-allowed tokens, which exercises
 * corners (escapes, whitespace, odd Unicode, empty strings) a trained model rarely visits.
 *
 * Schemas for sampled runs have bounded sizes (maxLength, maxItems, enums, integer ranges) so that
 * every output is finished long before maxTokens: each token spells at least one character, and
 * maxTokens (512) is above the longest text such a grammar allows (whitespace included).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  buildJsonGbnf,
  JSON_OBJECT_GBNF,
  JSON_VALUE_GBNF,
  jsonSchemaToGbnf,
} from '../src/grammar/index.js';
import { InvalidOptionError, loadModel, type Model } from '../src/index.js';
import { makeFixtureModel } from './fixtures/models.js';

const LOAD = { contextSize: 1024, maxSequences: 4, threads: 1 } as const;
const MAX_TOKENS = 512;

// ---------------------------------------------------------------------------------------------
// A small validator (the subset of JSON Schema the converter supports)
// ---------------------------------------------------------------------------------------------

type Schema = boolean | { [k: string]: unknown };

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function equal(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

function resolvePointer(root: Schema, ref: string): Schema {
  let node: unknown = root;
  for (const seg of ref.replace(/^#\/?/, '').split('/').filter((s) => s !== '')) {
    node = (node as Record<string, unknown>)[seg.replace(/~1/g, '/').replace(/~0/g, '~')];
  }
  if (node === undefined) throw new Error(`unresolved ${ref}`);
  return node as Schema;
}

function daysIn(year: number, month: number): number {
  const leap = (year % 4 === 0 && year % 100 !== 0) || year % 400 === 0;
  return [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][month - 1] ?? 0;
}

const FORMATS: Record<string, (s: string) => boolean> = {
  date: (s) => {
    const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(s);
    return !!m && Number(m[3]) >= 1 && Number(m[3]) <= daysIn(Number(m[1]), Number(m[2]));
  },
  time: (s) => /^([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)$/i.test(s),
  'date-time': (s) => {
    const [d, t, ...rest] = s.split(/[Tt]/);
    return rest.length === 0 && FORMATS.date!(d ?? '') && FORMATS.time!(t ?? '');
  },
  uuid: (s) => /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(s),
};

function typeOf(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  return typeof v;
}

/**
 * Errors of `value` against `schema` (empty: valid). `closed` also treats a missing
 * additionalProperties as false — the converter's documented generation choice.
 */
function validate(value: unknown, schema: Schema, root: Schema, closed: boolean, at = '$'): string[] {
  if (schema === true) return [];
  if (schema === false) return [`${at}: false schema`];
  const s = schema;
  const errors: string[] = [];
  const sub = (v: unknown, sch: unknown, where: string) => errors.push(...validate(v, sch as Schema, root, closed, where));
  if (typeof s.$ref === 'string') sub(value, resolvePointer(root, s.$ref), at);
  // allOf components are partial views of the object: not closed.
  if (Array.isArray(s.allOf)) s.allOf.forEach((a) => errors.push(...validate(value, a as Schema, root, false, at)));
  if (Array.isArray(s.anyOf) && !s.anyOf.some((a) => validate(value, a as Schema, root, closed, at).length === 0)) {
    errors.push(`${at}: matches no anyOf alternative`);
  }
  if (Array.isArray(s.oneOf) && s.oneOf.filter((a) => validate(value, a as Schema, root, closed, at).length === 0).length !== 1) {
    errors.push(`${at}: does not match exactly one oneOf alternative`);
  }
  if ('const' in s && !equal(value, s.const)) errors.push(`${at}: is not the const`);
  if (Array.isArray(s.enum) && !s.enum.some((e) => equal(value, e))) errors.push(`${at}: is not in the enum`);
  if (s.type !== undefined) {
    const types = (Array.isArray(s.type) ? s.type : [s.type]) as string[];
    const t = typeOf(value);
    const ok = types.some((ty) => ty === t || (ty === 'integer' && Number.isInteger(value)));
    if (!ok) return [...errors, `${at}: type ${t} is not ${types.join('|')}`];
  }
  if (isObj(value)) {
    const props = (s.properties ?? {}) as Record<string, unknown>;
    for (const r of (s.required ?? []) as string[]) if (!(r in value)) errors.push(`${at}: missing ${r}`);
    for (const [k, v] of Object.entries(value)) {
      if (Object.hasOwn(props, k)) sub(v, props[k], `${at}.${k}`);
      else if (s.additionalProperties === false || (closed && s.additionalProperties === undefined && s.properties)) {
        errors.push(`${at}: unexpected property ${JSON.stringify(k)}`);
      } else if (isObj(s.additionalProperties)) sub(v, s.additionalProperties, `${at}.${k}`);
    }
  }
  if (Array.isArray(value)) {
    if (typeof s.minItems === 'number' && value.length < s.minItems) errors.push(`${at}: fewer than ${s.minItems} items`);
    if (typeof s.maxItems === 'number' && value.length > s.maxItems) errors.push(`${at}: more than ${s.maxItems} items`);
    if (s.items !== undefined) value.forEach((v, i) => sub(v, s.items, `${at}[${i}]`));
  }
  // U+FFFD marks bytes that were not valid UTF-8: llama.cpp's grammar engine reads overlong byte
  // sequences (e.g. C1 81 as "A") as the character they spell, so what the grammar counted as one
  // character can decode to several U+FFFD. Random weights hit this about once in a few hundred
  // free-text outputs; lengths and patterns of such strings are not checked.
  if (typeof value === 'string' && !value.includes('\uFFFD')) {
    const length = [...value].length; // code points, as JSON Schema counts
    if (typeof s.minLength === 'number' && length < s.minLength) errors.push(`${at}: shorter than ${s.minLength}`);
    if (typeof s.maxLength === 'number' && length > s.maxLength) errors.push(`${at}: longer than ${s.maxLength}`);
    if (typeof s.pattern === 'string' && !new RegExp(s.pattern, 'u').test(value)) errors.push(`${at}: does not match ${s.pattern}`);
    if (typeof s.format === 'string' && !FORMATS[s.format]!(value)) errors.push(`${at}: is not a ${s.format}`);
  }
  if (typeof value === 'number') {
    if (typeof s.minimum === 'number' && value < s.minimum) errors.push(`${at}: below minimum`);
    if (typeof s.maximum === 'number' && value > s.maximum) errors.push(`${at}: above maximum`);
    if (typeof s.exclusiveMinimum === 'number' && value <= s.exclusiveMinimum) errors.push(`${at}: not above exclusiveMinimum`);
    if (typeof s.exclusiveMaximum === 'number' && value >= s.exclusiveMaximum) errors.push(`${at}: not below exclusiveMaximum`);
  }
  return errors;
}

// ---------------------------------------------------------------------------------------------
// Schemas
// ---------------------------------------------------------------------------------------------

const PERSON = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 8 },
    age: { type: 'integer' },
    active: { type: 'boolean' },
    role: { enum: ['admin', 'user', 'guest'] },
  },
  required: ['name', 'age', 'active', 'role'],
  additionalProperties: false,
};

const ITEMS = {
  type: 'array',
  items: {
    type: 'object',
    properties: { id: { type: 'integer', minimum: 0, maximum: 999 }, tag: { type: 'string', minLength: 1, maxLength: 3 } },
    required: ['id', 'tag'],
  },
  maxItems: 3,
};

const NESTED_REF = {
  $defs: {
    Point: { type: 'object', properties: { x: { type: 'integer', minimum: -99, maximum: 99 }, y: { type: 'integer', minimum: -99, maximum: 99 } }, required: ['x', 'y'] },
    Box: {
      type: 'object',
      properties: { min: { $ref: '#/$defs/Point' }, max: { $ref: '#/$defs/Point', description: 'annotations next to $ref are fine' } },
      required: ['min', 'max'],
    },
  },
  type: 'object',
  properties: { box: { $ref: '#/$defs/Box' }, label: { type: 'string', maxLength: 4 } },
  required: ['box'],
};

const SHAPES = {
  anyOf: [
    { type: 'object', properties: { kind: { const: 'circle' }, r: { type: 'integer', minimum: 1, maximum: 50 } }, required: ['kind', 'r'] },
    {
      type: 'object',
      properties: { kind: { const: 'rect' }, w: { type: 'integer', minimum: 1, maximum: 50 }, h: { type: 'integer', minimum: 1, maximum: 50 } },
      required: ['kind', 'w', 'h'],
    },
  ],
};

const NULLABLE = {
  type: 'object',
  properties: {
    nickname: { type: ['string', 'null'], maxLength: 4 },
    score: { type: ['integer', 'null'], minimum: 0, maximum: 10 },
    note: { anyOf: [{ type: 'string', maxLength: 3 }, { type: 'null' }] },
  },
  required: ['nickname', 'score', 'note'],
};

const CONSTS = {
  type: 'object',
  properties: { version: { const: 2 }, kind: { const: 'event' }, meta: { const: { a: [1, null, 'x"y'] } } },
  required: ['version', 'kind', 'meta'],
};

const FORMATTED = {
  type: 'object',
  properties: {
    day: { type: 'string', format: 'date' },
    at: { type: 'string', format: 'time' },
    id: { type: 'string', format: 'uuid' },
    code: { type: 'string', pattern: '^[A-Z]{2}-\\d{2,3}(-[a-c])?$' },
    ratio: { type: 'number', minimum: 0, maximum: 1 },
    delta: { type: 'number', exclusiveMinimum: -2, exclusiveMaximum: 2 },
    level: { type: 'integer', exclusiveMinimum: -5, maximum: 120 },
  },
  required: ['day', 'at', 'id', 'code', 'ratio', 'delta', 'level'],
};

const RECURSIVE = {
  $defs: {
    Node: {
      type: 'object',
      properties: { v: { type: 'integer', minimum: 0, maximum: 9 }, next: { anyOf: [{ $ref: '#/$defs/Node' }, { type: 'null' }] } },
      required: ['v', 'next'],
    },
  },
  $ref: '#/$defs/Node',
};

const MERGED = {
  allOf: [
    { $ref: '#/definitions/Base' },
    { properties: { extra: { type: 'boolean' } }, required: ['extra'] },
  ],
  definitions: { Base: { type: 'object', properties: { id: { type: 'integer', minimum: 1, maximum: 9 } }, required: ['id'] } },
};

/** Bounded json_object mode: the unbounded grammar lets random weights write strings forever. */
const BOUNDED_OBJECT = buildJsonGbnf({ root: 'object', maxDepth: 2, maxStringLength: 6, maxItems: 3, maxProperties: 3 });

// ---------------------------------------------------------------------------------------------

describe('jsonSchemaToGbnf: grammar text', () => {
  it('names rules after the schema path and keeps required properties in declared order', () => {
    const g = jsonSchemaToGbnf(PERSON);
    expect(g).toMatch(/^root ::= "\{" ws name-kv "," ws age-kv "," ws active-kv "," ws role-kv ws "\}"$/m);
    expect(g).toContain('name ::= "\\"" char{0,8} "\\""');
    expect(g).toContain('role ::= "\\"admin\\"" | "\\"user\\"" | "\\"guest\\""');
    expect(g).toContain('ws ::= | " " | "\\n" [ \\t]{0,20}');
    for (const line of g.trim().split('\n')) expect(line).toMatch(/^[a-zA-Z0-9-]+ ::= /);
    expect(jsonSchemaToGbnf(PERSON)).toBe(g); // deterministic
  });

  it('gives $defs their own (recursive) rules and lets optional properties be left out', () => {
    const g = jsonSchemaToGbnf(RECURSIVE);
    expect(g).toMatch(/^root ::= def-Node$/m);
    expect(g).toMatch(/^def-Node-next ::= def-Node \| null$/m);
    const optional = jsonSchemaToGbnf({ type: 'object', properties: { a: { type: 'integer' }, b: { type: 'integer' } } });
    expect(optional).toMatch(/^root ::= "\{" ws \( \( a-kv rest-1 \| b-kv \) ws \)\? "\}"$/m);
  });

  it('exports any-JSON grammars with bounded whitespace', () => {
    expect(JSON_VALUE_GBNF).toMatch(/^root ::= value$/m);
    expect(JSON_OBJECT_GBNF).toMatch(/^root ::= object$/m);
    expect(jsonSchemaToGbnf({})).toMatch(/^root ::= value$/m);
    expect(jsonSchemaToGbnf(true)).toMatch(/^root ::= value$/m);
    expect(jsonSchemaToGbnf({ type: 'object' })).toMatch(/^root ::= object$/m); // no properties: open
    expect(BOUNDED_OBJECT).toMatch(/^root ::= object-2$/m);
    expect(BOUNDED_OBJECT).toContain('string ::= "\\"" char{0,6} "\\""');
  });
});

describe('jsonSchemaToGbnf: unsupported or impossible schemas', () => {
  const cases: Array<[unknown, string, string]> = [
    [{ type: 'object', properties: { a: { not: { type: 'string' } } } }, 'not', '#/properties/a/not'],
    [{ type: 'object', patternProperties: { '^x': {} } }, 'patternProperties', '#/patternProperties'],
    [{ type: 'object', minProperties: 1 }, 'minProperties', '#/minProperties'],
    [{ type: 'array', uniqueItems: true }, 'uniqueItems', '#/uniqueItems'],
    [{ type: 'array', prefixItems: [{ type: 'string' }] }, 'prefixItems', '#/prefixItems'],
    [{ type: 'array', items: [{ type: 'string' }] }, 'items', '#/items'],
    [{ type: 'string', format: 'email' }, 'format', '#/format'],
    [{ type: 'string', pattern: '^(?=a)b$' }, 'pattern', '#/pattern'],
    [{ type: 'string', pattern: '^a\\bb$' }, 'pattern', '#/pattern'],
    [{ type: 'number', minimum: 0.5 }, 'minimum', '#/minimum'],
    [{ type: 'number', multipleOf: 0.5 }, 'multipleOf', '#/multipleOf'],
    [{ if: { type: 'string' }, then: { maxLength: 2 } }, 'if', '#/if'],
    [{ $ref: 'https://example.com/schema.json' }, '$ref', '#/$ref'],
    [{ $defs: { A: { type: 'object', properties: { xs: { type: 'array', contains: {} } } } }, $ref: '#/$defs/A' }, 'contains', '#/$defs/A/properties/xs/contains'],
    [{ type: 'object', properties: { 'a/b': { nullable: true } } }, 'nullable', '#/properties/a~1b/nullable'],
  ];

  it.each(cases.map(([schema, keyword, pointer]) => ({ schema, keyword, pointer })))('"$keyword" at $pointer', ({ schema, keyword, pointer }) => {
    let caught: unknown;
    try {
      jsonSchemaToGbnf(schema, { name: 'test' });
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(InvalidOptionError);
    const error = caught as InvalidOptionError;
    expect(error.option).toBe('response_format.json_schema');
    expect(error.code).toBe('INVALID_OPTION');
    expect(error.message).toContain(`"${keyword}"`);
    expect(error.message).toContain(pointer);
  });

  it('refuses schemas that match nothing, left recursion, bad $refs and non-schemas', () => {
    const bad: Array<[unknown, RegExp]> = [
      [{ type: 'string', enum: [1, 2] }, /matches no value/],
      [{ type: 'object', properties: { a: false }, required: ['a'] }, /matches no value/],
      [{ $defs: { A: { anyOf: [{ $ref: '#/$defs/A' }, { type: 'null' }] } }, $ref: '#/$defs/A' }, /left-recursive/],
      [{ $ref: '#/$defs/Missing' }, /does not resolve/],
      [{ type: 'strings' }, /"type"/],
      [42, /JSON schema/],
    ];
    for (const [schema, message] of bad) {
      let caught: unknown;
      try {
        jsonSchemaToGbnf(schema);
      } catch (error) {
        caught = error;
      }
      expect(caught, JSON.stringify(schema)).toBeInstanceOf(InvalidOptionError);
      expect((caught as InvalidOptionError).option).toBe('response_format.json_schema');
      expect((caught as Error).message).toMatch(message);
    }
    expect(() => jsonSchemaToGbnf({ not: {} }, { option: 'tools[0].function.parameters' })).toThrow(
      expect.objectContaining({ option: 'tools[0].function.parameters' }),
    );
  });
});

describe('jsonSchemaToGbnf: sampled outputs validate', { timeout: 120_000 }, () => {
  let llama: Model;
  let qwen: Model;

  beforeAll(async () => {
    [llama, qwen] = await Promise.all([
      makeFixtureModel({ arch: 'llama', type: 'q8_0' }).then((path) => loadModel(path, LOAD)),
      makeFixtureModel({ arch: 'qwen3moe', type: 'q8_0' }).then((path) => loadModel(path, LOAD)),
    ]);
  });
  afterAll(async () => {
    await llama?.dispose();
    await qwen?.dispose();
  });

  /** Samples with `grammar` for each seed (concurrently) and returns the finished, parsed outputs. */
  async function sample(model: Model, grammar: string, seeds: number[]): Promise<Array<{ value: unknown; text: string }>> {
    const results = await Promise.all(
      seeds.map((seed) => model.complete('JSON:', { temperature: 1, seed, maxTokens: MAX_TOKENS, grammar })),
    );
    return results.map((r, i) => {
      expect(r.finishReason, `seed ${seeds[i]}: ${JSON.stringify(r.text)}`).toBe('eog');
      return { value: JSON.parse(r.text) as unknown, text: r.text };
    });
  }

  async function expectValid(model: Model, schema: Schema, seeds: number[]): Promise<unknown[]> {
    const outputs = await sample(model, jsonSchemaToGbnf(schema), seeds);
    for (const { value, text } of outputs) expect(validate(value, schema, schema, true), text).toEqual([]);
    return outputs.map((o) => o.value);
  }

  it('llama.cpp accepts every grammar the converter produces', async () => {
    const corpus: unknown[] = [
      true,
      { type: 'string', maxLength: 5000 }, // above llama.cpp's repetition limit: chunked
      { type: 'array', items: { type: 'integer' }, minItems: 2, maxItems: 2500 },
      { type: 'string', pattern: '^\\w+@\\w+\\.(com|org)$' },
      { type: 'string', pattern: 'abc' },
      { type: 'string', pattern: '^[^"\\\\]{2,4}$' },
      { type: 'string', pattern: '^(a|b|)c?\\s*.{2}[\\u00e9-\\u00ff]*\\D$' },
      { type: 'string', pattern: '^a{3,}|^b$' },
      { type: 'object', properties: { '"q"': { type: 'integer' }, 'a\\b': {}, é: {}, '': {}, 'line\nbreak': {} }, additionalProperties: true },
      { type: 'object', additionalProperties: { type: 'string' } },
      { type: 'integer', minimum: -1000000, maximum: 123456789 },
      { type: 'integer', exclusiveMinimum: 5 },
      { type: 'integer', maximum: -7 },
      { type: 'number', exclusiveMinimum: 0 },
      { type: 'number', minimum: -5, maximum: -2 },
      { type: 'number', maximum: 10 },
      { enum: [{ a: [1, 2] }, [null], 'q"uote', 'ünï', 3.5, -0, true, null] },
      { type: ['integer', 'string', 'null', 'array'], maxLength: 2, maxItems: 1, items: { type: 'boolean' } },
      { type: 'string', format: 'date-time' },
      { oneOf: [{ $ref: '#/$defs/A' }, { type: 'null' }], $defs: { A: { type: 'object', properties: { a: { $ref: '#' } } } } },
      { $ref: '#/$defs/A', required: ['b'], $defs: { A: { type: 'object', properties: { b: { type: 'integer' } } } } },
      { type: 'object', properties: { a: { type: 'integer' } }, required: ['a', 'z'] },
    ];
    const runs = corpus.map((schema) => {
      const grammar = jsonSchemaToGbnf(schema);
      return llama.complete('x', { maxTokens: 1, grammar }).catch((error: unknown) => {
        throw new Error(`${JSON.stringify(schema)}: ${(error as Error).message}\n${grammar}`);
      });
    });
    for (const grammar of [JSON_VALUE_GBNF, JSON_OBJECT_GBNF, BOUNDED_OBJECT]) runs.push(llama.complete('x', { maxTokens: 1, grammar }));
    await Promise.all(runs);
  });

  it('an object with required string, integer, boolean and enum properties', async () => {
    await expectValid(llama, PERSON, [1, 2, 3]);
    await expectValid(qwen, PERSON, [4, 5]);
  });

  it('an array of objects (maxItems 3)', async () => {
    const outputs = await expectValid(llama, ITEMS, [1, 2, 3, 4]);
    for (const o of outputs) expect(Array.isArray(o)).toBe(true);
  });

  it('nested objects through $ref, and a recursive $ref', async () => {
    await expectValid(llama, NESTED_REF, [1, 2, 3]);
    await expectValid(qwen, NESTED_REF, [6]);
    await expectValid(llama, RECURSIVE, [1, 2, 3]);
  });

  it('anyOf of two object shapes, and allOf with a $ref', async () => {
    const outputs = await expectValid(llama, SHAPES, [1, 2, 3, 4, 5, 6]);
    expect(new Set(outputs.map((o) => (o as { kind: string }).kind)).size).toBeGreaterThan(0);
    await expectValid(llama, MERGED, [1, 2]);
  });

  it('nullable type arrays and const values', async () => {
    await expectValid(llama, NULLABLE, [1, 2, 3, 4]);
    const consts = await expectValid(llama, CONSTS, [1, 2]);
    for (const c of consts) expect(c).toEqual({ version: 2, kind: 'event', meta: { a: [1, null, 'x"y'] } });
  });

  it('formats, patterns and numeric ranges', async () => {
    await expectValid(llama, FORMATTED, [1, 2, 3]);
    await expectValid(qwen, FORMATTED, [7]);
  });

  it('json_object mode (bounded variant) yields JSON objects', async () => {
    for (const [model, seeds] of [[llama, [1, 2, 3]], [qwen, [1, 2]]] as const) {
      for (const { value, text } of await sample(model, BOUNDED_OBJECT, [...seeds])) {
        expect(isObj(value), text).toBe(true);
      }
    }
    // The unbounded grammar: random weights may not finish, but whatever comes out is an object prefix.
    const r = await llama.complete('JSON:', { temperature: 1, seed: 1, maxTokens: 48, grammar: JSON_OBJECT_GBNF });
    expect(r.text.startsWith('{')).toBe(true);
    if (r.finishReason === 'eog') expect(isObj(JSON.parse(r.text))).toBe(true);
  });

  it('additionalProperties: a schema allows extra keys of that type, never a declared name', async () => {
    const schema = { type: 'object', properties: { id: { type: 'integer', minimum: 0, maximum: 9 } }, required: ['id'], additionalProperties: { type: 'boolean' } };
    const grammar = jsonSchemaToGbnf(schema);
    expect(grammar).toMatch(/^root ::= "\{" ws id-kv \( "," ws additional-kv \)\* ws "\}"$/m);
    // Extra keys are free-form strings, so random weights may not close them: check what finishes.
    const results = await Promise.all([1, 2, 3].map((seed) => llama.complete('JSON:', { temperature: 1, seed, maxTokens: 64, grammar })));
    for (const r of results) {
      if (r.finishReason !== 'eog') continue;
      const value = JSON.parse(r.text) as Record<string, unknown>;
      expect(validate(value, schema, schema, false), r.text).toEqual([]);
    }
  });
});
