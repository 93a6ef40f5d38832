// Types for scripts/llama.mjs (plain JS so that `npm install` needs no TypeScript).
export const LLAMA_PACKAGE: string;
export const LLAMA_COMMIT: string;
export const repoRoot: string;
export const llamaDir: string;
export const REFERENCE_TOOLS: string[];
export function cacheDir(): string;
export function fetchLlama(): void;
export function buildVariant(): 'cpu' | 'cuda';
export function buildDir(variant?: 'cpu' | 'cuda'): string;
export function staticLibs(variant?: 'cpu' | 'cuda'): string[];
export function cmakeBuildLlama(variant?: 'cpu' | 'cuda'): string;
export function referenceTool(name: string, variant?: 'cpu' | 'cuda'): string;
export function ensureReferenceTool(name: string, variant?: 'cpu' | 'cuda'): string;
export function portable(): boolean;
export type CudaToolchain =
  | { ok: true; nvcc: string; toolkit: string; cublas: { libDir: string; includeDir?: string; python?: string } }
  | { ok: false; why: string };
export function detectCuda(): CudaToolchain;
export function cudaBuildEnv(variant?: 'cpu' | 'cuda'): { cmakeArgs: string[]; libDirs: string[]; rpath: string[] };
export function cudaLinkFlags(variant?: 'cpu' | 'cuda'): string;
