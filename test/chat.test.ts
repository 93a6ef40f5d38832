/**
 * Chat templates, special-token parsing, chat() and the tokenizer against llama.cpp's own test
 * vectors (models/ggml-vocab-*.gguf.inp/.out, as checked by tests/test-tokenizer-0.cpp).
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GenesisError, loadModel, type ChatMessage, type Model } from '../src/index.js';
import { makeFixtureModel, vocabPath } from './fixtures/models.js';

/**
 * One decode thread per model: ggml's CPU threads spin-wait at every barrier, so on this shared
 * 2-core machine (and with vitest running two files at once) threads: 2 oversubscribes the cores and
 * a step can take 100x longer (measured under load: 4 x 24 greedy tokens 21.8 s with 2 threads,
 * 0.18 s with 1). Results do not depend on the thread count.
 */
const THREADS = 1;

const MESSAGES: ChatMessage[] = [
  { role: 'system', content: 'You are a helpful assistant.' },
  { role: 'user', content: 'Hello!' },
];
const CHATML =
  '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n';
const GREEDY = { temperature: 0, maxTokens: 12, ignoreEos: true } as const;

/**
 * Parses llama.cpp's tokenizer vectors exactly like tests/test-tokenizer-0.cpp: inputs are separated
 * by "\n__ggml_vocab_test__\n", outputs are one line of space-separated ids per input.
 */
function readVectors(vocab: string): Array<{ input: string; ids: number[] }> {
  const inp = readFileSync(`${vocabPath(vocab)}.inp`, 'utf8');
  const out = readFileSync(`${vocabPath(vocab)}.out`, 'utf8');
  const sep = '\n__ggml_vocab_test__\n';
  const inputs: string[] = [];
  let pos = 0;
  while (pos < inp.length) {
    const next = inp.indexOf(sep, pos);
    if (next < 0) {
      inputs.push(inp.slice(pos));
      break;
    }
    inputs.push(inp.slice(pos, next));
    pos = next + sep.length;
  }
  const lines = out.split('\n');
  if (lines.at(-1) === '') lines.pop();
  expect(lines).toHaveLength(inputs.length);
  return inputs.map((input, i) => {
    const line = lines[i]!.trim();
    return { input, ids: line === '' ? [] : line.split(' ').map(Number) };
  });
}

describe('chat and tokenizer', { timeout: 60_000 }, () => {
  let llama: Model; // llama-spm vocab, llama-2 '[INST]' template
  let qwen: Model; // qwen2 vocab, ChatML template

  beforeAll(async () => {
    const llamaPath = await makeFixtureModel({ arch: 'llama', vocab: 'llama-spm', type: 'f32', nLayer: 2, nEmbd: 64 });
    const qwenPath = await makeFixtureModel({ arch: 'qwen3moe', vocab: 'qwen2', type: 'f16', nLayer: 2, nEmbd: 64 });
    llama = await loadModel(llamaPath, { contextSize: 256, maxSequences: 2, threads: THREADS });
    qwen = await loadModel(qwenPath, { contextSize: 256, maxSequences: 2, threads: THREADS });
  }, 120_000);

  afterAll(async () => {
    await llama?.dispose();
    await qwen?.dispose();
  });

  describe('applyChatTemplate', () => {
    it('formats ChatML with the model template', () => {
      expect(qwen.info.chatTemplate).toContain('<|im_start|>');
      expect(qwen.applyChatTemplate(MESSAGES)).toBe(CHATML);
      expect(qwen.applyChatTemplate(MESSAGES, { addAssistant: false })).toBe(CHATML.slice(0, -'<|im_start|>assistant\n'.length));
      expect(
        qwen.applyChatTemplate([...MESSAGES, { role: 'assistant', content: 'Hi.' }, { role: 'user', content: 'Bye' }]),
      ).toBe(`${CHATML}Hi.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n`);
    });

    it('formats the llama-2 template, and a named template overrides the model one', () => {
      expect(llama.applyChatTemplate(MESSAGES)).toBe('[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello! [/INST]');
      expect(llama.applyChatTemplate([...MESSAGES, { role: 'assistant', content: 'Hi.' }, { role: 'user', content: 'Bye' }])).toBe(
        '[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello! [/INST]Hi.</s>[INST] Bye [/INST]',
      );
      expect(llama.applyChatTemplate(MESSAGES, { template: 'chatml' })).toBe(CHATML);
      // A full Jinja template string is recognised too.
      expect(llama.applyChatTemplate(MESSAGES, { template: qwen.info.chatTemplate! })).toBe(CHATML);
    });

    it('reports CHAT_TEMPLATE for a model without a template and for an unknown template', async () => {
      const bare = await loadModel(
        await makeFixtureModel({ arch: 'llama', vocab: 'llama-spm', type: 'f32', nLayer: 2, nEmbd: 64, chatTemplate: null }),
        { contextSize: 64, maxSequences: 1, threads: THREADS },
      );
      try {
        expect(bare.info.chatTemplate).toBeNull();
        const calls = [
          () => bare.applyChatTemplate(MESSAGES),
          () => bare.chat(MESSAGES),
          () => qwen.applyChatTemplate(MESSAGES, { template: 'not-a-known-template-xyz' }),
          () => qwen.chat(MESSAGES, { chatTemplate: 'not-a-known-template-xyz' }),
        ];
        for (const call of calls) {
          let caught: unknown;
          try {
            call();
          } catch (error) {
            caught = error;
          }
          expect(caught).toBeInstanceOf(GenesisError);
          expect((caught as GenesisError).code).toBe('CHAT_TEMPLATE');
        }
        // The template can be supplied per call.
        expect(bare.applyChatTemplate(MESSAGES, { template: 'chatml' })).toBe(CHATML);
        const r = await bare.chat(MESSAGES, { ...GREEDY, chatTemplate: 'chatml' }).result;
        expect(r.tokens).toHaveLength(12);
      } finally {
        await bare.dispose();
      }
    });
  });

  describe('special tokens', () => {
    it('parses <|im_start|> as one special token only with parseSpecial', () => {
      const [imStart, ...rest] = qwen.tokenize('<|im_start|>', { addSpecial: false, parseSpecial: true });
      expect(rest).toEqual([]);
      expect(imStart).toBe(151644);
      expect(qwen.detokenize([imStart!], { renderSpecial: true })).toBe('<|im_start|>');
      expect(qwen.detokenize([imStart!])).toBe('');
      const imEnd = qwen.tokenize('<|im_end|>', { addSpecial: false })[0]!;
      expect(imEnd).toBe(151645);
      expect(qwen.info.specialTokens.eot).toBe(imEnd);

      const parsed = qwen.tokenize(CHATML, { parseSpecial: true });
      expect(parsed[0]).toBe(imStart);
      expect(parsed.filter((t) => t === imStart)).toHaveLength(3);
      expect(parsed.filter((t) => t === imEnd)).toHaveLength(2);
      expect(qwen.detokenize(parsed, { renderSpecial: true })).toBe(CHATML);

      const literal = qwen.tokenize(CHATML, { parseSpecial: false });
      expect(literal).not.toContain(imStart);
      expect(literal).not.toContain(imEnd);
      expect(literal.length).toBeGreaterThan(parsed.length);
      expect(qwen.detokenize(literal)).toBe(CHATML);
      // The default parses specials (the same as generate() does for a text prompt).
      expect(qwen.tokenize(CHATML)).toEqual(parsed);
    });

    it('adds BOS with addSpecial for the SPM vocab only', () => {
      expect(llama.info.specialTokens).toMatchObject({ bos: 1, eos: 2, addBos: true });
      expect(llama.tokenize('Hello')).toEqual([1, 15043]);
      expect(llama.tokenize('Hello', { addSpecial: false })).toEqual([15043]);
      expect(llama.tokenize('<s>Hello', { addSpecial: false })).toEqual([1, 15043]);
      expect(llama.tokenize('<s>Hello', { addSpecial: false, parseSpecial: false })).not.toContain(1);
      expect(qwen.info.specialTokens.addBos).toBe(false);
      expect(qwen.tokenize('Hello')).toEqual(qwen.tokenize('Hello', { addSpecial: false }));
    });
  });

  describe('chat()', () => {
    it('ChatML: greedy output equals generate() on the formatted text', async () => {
      const chat = await qwen.chat(MESSAGES, GREEDY).result;
      const plain = await qwen.generate(CHATML, GREEDY).result;
      expect(chat.tokens).toHaveLength(12);
      expect(chat.tokens).toEqual(plain.tokens);
      expect(chat.text).toBe(plain.text);
      expect(chat.usage.promptTokens).toBe(qwen.tokenize(CHATML).length);
      expect(chat.usage.promptTokens).toBe(21);
    });

    it('llama-2: the tokenizer adds the only BOS', async () => {
      const text = llama.applyChatTemplate(MESSAGES);
      const chat = await llama.chat(MESSAGES, GREEDY).result;
      const plain = await llama.generate(text, GREEDY).result;
      expect(chat.tokens).toEqual(plain.tokens);
      expect(chat.usage.promptTokens).toBe(llama.tokenize(text).length);
      expect(llama.tokenize(text).filter((t) => t === 1)).toHaveLength(1);
    });

    it('a template that writes "<s>" itself does not get a second BOS', async () => {
      // llama.cpp's built-in 'gigachat' template starts with the literal BOS text.
      const text = llama.applyChatTemplate(MESSAGES, { template: 'gigachat' });
      expect(text.startsWith('<s>')).toBe(true);
      const once = llama.tokenize(text, { addSpecial: false });
      expect(once[0]).toBe(1);
      expect(once[1]).not.toBe(1);
      const chat = await llama.chat(MESSAGES, { ...GREEDY, chatTemplate: 'gigachat' }).result;
      expect(chat.usage.promptTokens).toBe(once.length);
      const plain = await llama.generate(once, GREEDY).result;
      expect(chat.tokens).toEqual(plain.tokens);
      // Tokenizing with addSpecial would have doubled it.
      expect(llama.tokenize(text).slice(0, 2)).toEqual([1, 1]);
    });
  });

  describe("llama.cpp's tokenizer test vectors", () => {
    // tests/test-tokenizer-0.cpp calls common_tokenize(ctx, text, add_special = false, parse_special = false).
    for (const [vocab, model] of [
      ['llama-spm', () => llama],
      ['qwen2', () => qwen],
    ] as const) {
      it(vocab, () => {
        const vectors = readVectors(vocab);
        expect(vectors.length).toBeGreaterThanOrEqual(40);
        const failures: string[] = [];
        for (const { input, ids } of vectors) {
          const got = model().tokenize(input, { addSpecial: false, parseSpecial: false });
          if (got.join(' ') !== ids.join(' ')) failures.push(`${JSON.stringify(input)}: expected ${ids.join(' ')}, got ${got.join(' ')}`);
        }
        expect(failures).toEqual([]);
        // Round trip where the vocab can represent the text exactly (byte-level BPE: always).
        if (vocab === 'qwen2') {
          for (const { input, ids } of vectors) expect(model().detokenize(ids)).toBe(input);
        }
      });
    }
  });
});
