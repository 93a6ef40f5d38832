/**
 * The built-in demo model used when no model is given: a small llama-shaped model with random
 * weights and llama.cpp's real Llama (SentencePiece) tokenizer, generated on first use and cached.
 */
import { existsSync } from 'node:fs';
import { defaultVocabDir, makeSyntheticModel, vocabPath, type SyntheticModelOptions } from './models.js';

export const DEFAULT_MODEL: SyntheticModelOptions = {
  arch: 'llama',
  vocab: 'llama-spm',
  nLayer: 4,
  nEmbd: 256,
  nHead: 8,
  nHeadKv: 4,
  nFf: 768,
  type: 'q8_0',
  seed: 2026,
  name: 'genesis-demo (synthetic, random weights)',
};

export async function ensureDefaultModel(options: { onProgress?: (message: string) => void } = {}): Promise<string> {
  const vocab = vocabPath(DEFAULT_MODEL.vocab!, defaultVocabDir());
  if (!existsSync(vocab)) {
    throw new Error(`the demo model needs llama.cpp's tokenizer file ${vocab}: run \`npm install\` in the package first`);
  }
  options.onProgress?.('preparing the built-in demo model (generated once, then cached)...');
  return makeSyntheticModel(DEFAULT_MODEL);
}
