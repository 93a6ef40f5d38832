#!/usr/bin/env node
/**
 * genesis: command-line front end.
 *   genesis generate --model M --prompt "..."   stream a completion to stdout
 *   genesis info M                              describe a model file
 *   genesis plan M [--memory-budget SIZE]       memory per device before loading; the fitted plan
 *   genesis demo                                continuous batching on the built-in synthetic model
 *   genesis serve [--model [name=]M ...]        OpenAI-compatible HTTP server with a chat page
 *   genesis hash M [--tensors] [--json]         SHA-256 of a model's tensor data (llama-gguf-hash's convention)
 *   genesis verify R [--model M]                check a signed generation receipt
 *   genesis replay R --model M                  re-run a receipt and compare the output tokens
 *   genesis bench [--quick] [--model ...]       benchmarks against llama.cpp's own tools
 *   genesis fingerprint make|check ...          OML-style fingerprint pairs and signed checks
 *   genesis rpc-server [--host H] [--port P]    lend this machine's devices to models elsewhere (llama.cpp RPC)
 * Argument parsing uses node:util parseArgs (Node's own, no dependency).
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { GenesisError } from '../errors.js';
import { estimateMemory, planMemory, type DeviceMemoryEstimate } from '../memory.js';
import { isLoopback, startRpcServer } from '../rpc.js';
import { loadModel, type Model } from '../model.js';
import type { GenerateOptions, KvCacheType, LoadModelOptions } from '../options.js';
import { ServerConfigError } from '../server/app.js';
import type { FusedModelSpec } from '../server/fused.js';
import { serve, type ServeModelSpec } from '../server/serve.js';
import { ensureDefaultModel } from '../synthetic/default-model.js';
import { benchCommand, BENCH_USAGE, bytes, splitSettings } from './bench.js';
import { fingerprintCommand, FINGERPRINT_USAGE } from './fingerprint.js';
import { progressBar } from './progress.js';
import { UsageError } from './usage-error.js';
import { hashModel } from '../verify/identity.js';
import { decodeReceipt, replayReceipt, verifyReceipt, type ReceiptEnvelope } from '../verify/receipt.js';
import { readFileSync } from 'node:fs';

const USAGE = `Usage:
  genesis generate --model <file.gguf> --prompt <text> [options]
  genesis info <file.gguf> [--json]
  genesis plan <file.gguf> [model options] [--memory-budget SIZE] [--json]
  genesis demo [--model <file.gguf>] [--requests N]
  genesis serve [--model [name=]<file.gguf> ...] [--host H] [--port P] [--api-key K] [options]
  genesis hash <file.gguf> [--tensors] [--json] [--no-cache]
  genesis verify <receipt.json> [--model <file.gguf>] [--public-key <key.pem>] [--json]
  genesis replay <receipt.json> --model <file.gguf> [--threads N]
  genesis bench [--quick] [--model preset[:type[:layers]] | <file.gguf> ...] [options]
  genesis fingerprint make|check --model <file.gguf> ...
  genesis rpc-server [--host 127.0.0.1] [--port 50052] [--device NAME ...] [--threads N]
                     [--cache DIR] [--allow-remote]

generate options:
  --max-tokens N        tokens to generate (default 256)
  --temperature T       0 = greedy (default 0.8)
  --top-k K --top-p P --min-p P --seed S
  --repeat-penalty R --frequency-penalty F --presence-penalty P
  --stop TEXT           stop string (repeatable)
  --chat                format --prompt as a user message with the model's chat template
  --system TEXT         system message (with --chat)
model options:
  --context-size N --max-sequences N --threads N --gpu-layers N|max --batch-size N
  --cache-type-k T --cache-type-v T    KV cache types: f16 (default), q8_0, q4_0, q4_1, q5_0, q5_1,
                                       iq4_nl, bf16, f32 (a quantized V turns flash attention on)
  --state-checkpoints N                recurrent and hybrid models: copies of each sequence's state
                                       kept for the prompt cache (default 4, 0: none)
  --state-checkpoint-memory SIZE       host memory all those copies may hold (default: a quarter
                                       of the machine's), e.g. 8G
  --cpu-moe N                          MoE: keep the experts of the first N layers in host memory
                                       (llama.cpp's --n-cpu-moe); the rest of those layers offloads
  --gpu-experts N                      MoE with --cpu-moe: copies of N experts of each such layer on
                                       its GPU, the hottest by --expert-heat (and the counts of this
                                       run with --expert-stats); output unchanged
  --expert-heat FILE                   expert counts to choose them by: a JSON file holding an
                                       earlier run's model.expertStats()
  --expert-replace N                   with --gpu-experts and --expert-stats: choose them again
                                       every N decoded tokens
  --moe-placement layers|experts       with --memory-budget, MoE experts that do not all fit on
                                       the GPU: whole layers' in host memory (layers, default), or
                                       all there and each layer's hottest copied (experts)
  --split-mode none|layer|row|tensor   how offloaded layers spread over several devices (layer)
  --tensor-split A,B,...               share per offload device, RPC devices first (e.g. 3,1)
  --main-gpu I                         device index for --split-mode none
  --rpc HOST:PORT[,HOST:PORT...]       add devices lent by genesis rpc-server (llama.cpp RPC);
                                       trusted networks only: the protocol has no authentication
rpc-server options (llama.cpp's RPC server, from the same source; one client at a time):
  --host H --port P     listen address (default 127.0.0.1:50052); a non-loopback address needs
                        --allow-remote and prints a warning: the protocol has no authentication
  --device NAME         a device to serve, e.g. CUDA0 (repeatable; default: every GPU, else CPU)
  --threads N           CPU threads when serving the CPU (default: all cores)
  --cache DIR           keep large tensors on disk so that a reload skips sending them
serve options (OpenAI-compatible API, chat page at /; no --model: the built-in demo model):
  --model [name=]FILE   a model to serve, named by the request's "model" field (repeatable;
                        default name: the file name without .gguf)
  --host H              address to listen on (default 127.0.0.1)
  --port P              (default 8080)
  --api-key K           bearer key for /v1 and /metrics (or GENESIS_API_KEY); required when
                        --host is not a loopback address
  --max-queue N         requests waiting for a sequence before 429 (default: no limit)
  --max-tokens-limit N  largest max_tokens a request may ask for (default 4096)
  --max-choices N       largest n per request (default 8)
  --body-limit BYTES    largest request body (default 1048576)
  --drain-timeout S     on SIGTERM/SIGINT, wait this long for requests in flight (default 30)
  --log-level L         log requests (Fastify/pino JSON on stdout): info, warn, ...
  --memory-budget SIZE  host memory for all models (e.g. 6G, 512M): the models that fit load at
                        start, the others on first request; idle ones are unloaded for room
  --keep-alive S        with --memory-budget: unload a model idle for S seconds
  --draft [name=]FILE   speculative decoding: a smaller model with the same tokenizer drafts
                        tokens for the model named (default: the first); output unchanged.
                        FILE 'mtp': the model's own multi-token-prediction layers draft
  --draft-max N         tokens drafted per step (default 4)
  --fuse NAME=A:W,B:W   logit fusion: a virtual model NAME whose tokens the served models A, B, ...
                        (same tokenizer; A's chat template) choose together, their log-probabilities
                        weighted by W (repeatable; e.g. --fuse duo=chat:0.7,other:0.3)
  --kv-budget N         one KV pool of N tokens per model shared by its sequences, instead of
                        room for all at full length; under pressure the lowest-priority sequence
                        is preempted and recomputed later (output unchanged)
  --kv-swap SIZE        with --kv-budget or --kv-paged: host memory (e.g. 8G) preempted sequences'
                        KV is copied to and back from, instead of recomputing them
  --kv-paged            paged attention: each sequence attends over its own KV cells only,
                        through a per-sequence cell list (turns flash attention on)
  --kv-block-size N     with --kv-paged: cells taken in aligned blocks of N (a power of two up to
                        256); prefixes shared in whole blocks (default 1)
  --fused-moe-routing   group-limited MoE routing (DeepSeek-V3-style expert groups) in one op
                        instead of llama.cpp's nine: same experts, same output
  --expert-stats        count the tokens routed to each expert of every MoE layer (all models
                        served must be MoE); exported on /metrics as genesis_expert_tokens_total
${BENCH_USAGE}${FINGERPRINT_USAGE}`;

const modelOptions = {
  model: { type: 'string', short: 'm' },
  'context-size': { type: 'string' },
  'max-sequences': { type: 'string' },
  'batch-size': { type: 'string' },
  threads: { type: 'string', short: 't' },
  'gpu-layers': { type: 'string' },
  'cache-type-k': { type: 'string' },
  'cache-type-v': { type: 'string' },
  'state-checkpoints': { type: 'string' },
  'state-checkpoint-memory': { type: 'string' },
  'cpu-moe': { type: 'string' },
  'gpu-experts': { type: 'string' },
  'expert-heat': { type: 'string' },
  'expert-replace': { type: 'string' },
  'moe-placement': { type: 'string' },
  'split-mode': { type: 'string' },
  'tensor-split': { type: 'string' },
  'main-gpu': { type: 'string' },
  rpc: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const satisfies ParseArgsConfig['options'];

function int(name: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isFinite(n)) throw new UsageError(`--${name} expects a number, got ${JSON.stringify(value)}`);
  return n;
}

/** "6G", "512M", "1.5GiB" or plain bytes. */
function loadOptions(values: Record<string, unknown>): LoadModelOptions {
  const gpu = values['gpu-layers'] as string | undefined;
  return {
    contextSize: int('context-size', values['context-size'] as string | undefined),
    maxSequences: int('max-sequences', values['max-sequences'] as string | undefined),
    batchSize: int('batch-size', values['batch-size'] as string | undefined),
    threads: int('threads', values.threads as string | undefined),
    gpuLayers: gpu === 'max' ? 'max' : int('gpu-layers', gpu),
    ...kvCacheTypes(values['cache-type-k'] as string | undefined, values['cache-type-v'] as string | undefined),
    stateCheckpoints: int('state-checkpoints', values['state-checkpoints'] as string | undefined),
    stateCheckpointMemory: bytes('state-checkpoint-memory', values['state-checkpoint-memory'] as string | undefined),
    ...splitSettings(values as Parameters<typeof splitSettings>[0]),
    cpuMoeLayers: int('cpu-moe', values['cpu-moe'] as string | undefined),
    gpuExperts: int('gpu-experts', values['gpu-experts'] as string | undefined),
    expertHeat: expertHeatFile(values['expert-heat'] as string | undefined),
    expertReplaceTokens: int('expert-replace', values['expert-replace'] as string | undefined),
    moePlacement: values['moe-placement'] as LoadModelOptions['moePlacement'],
    onProgress: process.stderr.isTTY ? progressBar('loading') : undefined,
  };
}

/** --expert-heat FILE: the JSON of an earlier run's expertStats() (loadModel checks its shape). */
function expertHeatFile(path: string | undefined): LoadModelOptions['expertHeat'] {
  if (path === undefined) return undefined;
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (error) {
    throw new UsageError(`--expert-heat ${JSON.stringify(path)}: cannot read it (${(error as Error).message})`);
  }
  try {
    return JSON.parse(text) as LoadModelOptions['expertHeat'];
  } catch (error) {
    throw new UsageError(`--expert-heat ${JSON.stringify(path)}: not JSON (${(error as Error).message}); expected an expertStats() result`);
  }
}

/** --cache-type-k/-v as kvCacheType (either alone leaves the other f16, as in llama.cpp); checked by loadModel. */
function kvCacheTypes(k: string | undefined, v: string | undefined): Pick<LoadModelOptions, 'kvCacheType'> {
  if (k === undefined && v === undefined) return {};
  return { kvCacheType: { k: (k ?? 'f16') as KvCacheType, v: (v ?? 'f16') as KvCacheType } };
}

/** "0-3", "0-1,5": layer indices as ranges. */
function layerRanges(layers: number[]): string {
  const out: string[] = [];
  for (let i = 0; i < layers.length; ) {
    let j = i;
    while (j + 1 < layers.length && layers[j + 1] === layers[j]! + 1) j++;
    out.push(i === j ? String(layers[i]) : `${layers[i]}-${layers[j]}`);
    i = j + 1;
  }
  return out.join(',');
}

/** One line per device that holds something: bytes, and which layers. */
function placementLines(devices: DeviceMemoryEstimate[]): string[] {
  const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
  return devices
    .filter((d) => d.total > 0 || d.host || d.layers.length > 0)
    .map((d) => {
      const name = d.kind === 'rpc' ? `${d.device} (${d.description})` : d.device;
      const layers = d.layers.length > 0 ? `layers ${layerRanges(d.layers)}${d.output ? ' + output' : ''}` : d.output ? 'output layer' : 'no layers';
      return `${name.padEnd(6)} ${mib(d.total).padStart(12)}  ${layers}; weights ${mib(d.weights)}, KV cache ${mib(d.kvCache)}, compute ${mib(d.compute)}`;
    });
}

async function open(path: string, options: LoadModelOptions): Promise<Model> {
  const model = await loadModel(path, options);
  if (process.stderr.isTTY) process.stderr.write('\n');
  return model;
}

async function generateCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      ...modelOptions,
      prompt: { type: 'string', short: 'p' },
      'max-tokens': { type: 'string', short: 'n' },
      temperature: { type: 'string' },
      'top-k': { type: 'string' },
      'top-p': { type: 'string' },
      'min-p': { type: 'string' },
      seed: { type: 'string' },
      'repeat-penalty': { type: 'string' },
      'frequency-penalty': { type: 'string' },
      'presence-penalty': { type: 'string' },
      stop: { type: 'string', multiple: true },
      chat: { type: 'boolean' },
      system: { type: 'string' },
    },
  });
  if (values.help) return void process.stdout.write(USAGE);
  if (!values.model) throw new UsageError('generate needs --model <file.gguf>');
  if (values.prompt === undefined) throw new UsageError('generate needs --prompt <text>');
  const options: GenerateOptions = {
    maxTokens: int('max-tokens', values['max-tokens']) ?? 256,
    temperature: int('temperature', values.temperature),
    topK: int('top-k', values['top-k']),
    topP: int('top-p', values['top-p']),
    minP: int('min-p', values['min-p']),
    seed: int('seed', values.seed),
    repeatPenalty: int('repeat-penalty', values['repeat-penalty']),
    frequencyPenalty: int('frequency-penalty', values['frequency-penalty']),
    presencePenalty: int('presence-penalty', values['presence-penalty']),
    stop: values.stop,
  };
  const model = await open(values.model, loadOptions(values));
  const controller = new AbortController();
  process.once('SIGINT', () => controller.abort());
  try {
    const messages = [
      ...(values.system ? [{ role: 'system', content: values.system }] : []),
      { role: 'user', content: values.prompt },
    ];
    const run = values.chat
      ? model.chat(messages, { ...options, signal: controller.signal })
      : model.generate(values.prompt, { ...options, signal: controller.signal });
    for await (const chunk of run) process.stdout.write(chunk.text);
    const r = await run.result;
    process.stdout.write('\n');
    process.stderr.write(
      `[${r.finishReason}] ${r.usage.promptTokens} prompt tokens (${r.timings.promptTokensPerSecond.toFixed(1)} t/s), ` +
        `${r.usage.completionTokens} generated (${r.timings.tokensPerSecond.toFixed(1)} t/s), seed ${r.seed}\n`,
    );
  } finally {
    await model.dispose();
  }
}

async function infoCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { ...modelOptions, json: { type: 'boolean' } },
  });
  if (values.help) return void process.stdout.write(USAGE);
  const path = positionals[0] ?? values.model;
  if (!path) throw new UsageError('info needs a model file: genesis info <file.gguf>');
  const model = await open(path, { ...loadOptions(values), maxSequences: 1, contextSize: 256 });
  try {
    const { metadata, chatTemplate, ...info } = model.info;
    if (values.json) {
      process.stdout.write(`${JSON.stringify({ ...info, chatTemplate, metadata }, null, 2)}\n`);
      return;
    }
    const rows: Array<[string, string]> = [
      ['file', info.path],
      ['architecture', info.architecture],
      ['name', info.name || '-'],
      ['description', info.description],
      ['parameters', info.parameters.toLocaleString('en-US')],
      ['size', `${(info.sizeBytes / 2 ** 20).toFixed(1)} MiB`],
      ['file type', info.fileType],
      ['layers', String(info.layers)],
      ['embedding', String(info.embeddingLength)],
      ['heads (kv)', `${info.heads} (${info.kvHeads})`],
      ['experts (used)', info.experts ? `${info.experts} (${info.expertsUsed})` : '-'],
      ['train context', String(info.trainContextLength)],
      ['vocab', String(info.vocabSize)],
      ['chat template', chatTemplate ? `${chatTemplate.length} chars` : 'none'],
      ['split', `${info.placement.splitMode}${info.placement.tensorSplit.length ? ` ${info.placement.tensorSplit.join(':')}` : ''}`],
    ];
    const width = Math.max(...rows.map(([k]) => k.length));
    for (const [k, v] of rows) process.stdout.write(`${k.padEnd(width)}  ${v}\n`);
    process.stdout.write('placement\n');
    for (const line of placementLines(info.placement.devices)) process.stdout.write(`  ${line}\n`);
  } finally {
    await model.dispose();
  }
}

async function planCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { ...modelOptions, 'memory-budget': { type: 'string' }, json: { type: 'boolean' } },
  });
  if (values.help) return void process.stdout.write(USAGE);
  const path = positionals[0] ?? values.model;
  if (!path) throw new UsageError('plan needs a model file: genesis plan <file.gguf> [--memory-budget SIZE]');
  const { onProgress: _unused, ...options } = loadOptions(values);
  const budget = bytes('memory-budget', values['memory-budget']);
  const plan = budget !== undefined ? await planMemory(path, { ...options, memoryBudget: budget }) : undefined;
  const estimate = plan?.estimate ?? (await estimateMemory(path, options));
  if (values.json) return void process.stdout.write(`${JSON.stringify(plan ?? estimate, null, 2)}\n`);
  process.stdout.write(`${path}: contextSize ${estimate.options.contextSize} × ${estimate.options.maxSequences} sequences, KV ${(estimate.kvBytesPerToken / 1024).toFixed(1)} KiB per token\n`);
  for (const line of placementLines(estimate.devices)) process.stdout.write(`  ${line}\n`);
  if (plan) {
    const copies = plan.options.gpuExperts !== undefined ? `, gpuExperts ${plan.options.gpuExperts}` : '';
    process.stdout.write(`plan: contextSize ${plan.options.contextSize}, gpuLayers ${plan.options.gpuLayers}, cpuMoeLayers ${plan.options.cpuMoeLayers}${copies}\n`);
    for (const line of plan.explanation) process.stdout.write(`  ${line}\n`);
  }
}

async function demoCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: { ...modelOptions, requests: { type: 'string' }, 'max-tokens': { type: 'string' } },
  });
  if (values.help) return void process.stdout.write(USAGE);
  let path = values.model;
  if (!path) {
    path = await ensureDefaultModel({ onProgress: (m: string) => process.stderr.write(`${m}\n`) });
    process.stderr.write(`no --model given: using the built-in demo model ${path}\n`);
    process.stderr.write('(synthetic, RANDOM WEIGHTS: the text is noise; tokens, batching and speed are real)\n');
  }
  const requests = int('requests', values.requests) ?? 8;
  const model = await open(path!, { ...loadOptions(values), maxSequences: int('max-sequences', values['max-sequences']) ?? requests });
  try {
    const prompts = Array.from({ length: requests }, (_, i) => `Request ${i + 1}: tell me something about the number ${i + 1}.`);
    const started = performance.now();
    const runs = prompts.map((p) => model.generate(p, { maxTokens: int('max-tokens', values['max-tokens']) ?? 64, temperature: 0 }));
    const lengths = new Array<number>(requests).fill(0);
    await Promise.all(
      runs.map(async (run, i) => {
        for await (const chunk of run) lengths[i]! += chunk.tokens.length;
      }),
    );
    const results = await Promise.all(runs.map((r) => r.result));
    const seconds = (performance.now() - started) / 1000;
    const total = results.reduce((n, r) => n + r.usage.completionTokens, 0);
    results.forEach((r, i) => process.stdout.write(`#${i + 1} [${r.finishReason}, ${r.usage.completionTokens} tokens] ${JSON.stringify(r.text.slice(0, 60))}\n`));
    const stats = model.stats();
    process.stdout.write(
      `${requests} concurrent requests, ${total} tokens in ${seconds.toFixed(2)} s: ${(total / seconds).toFixed(1)} tokens/s aggregate; ` +
        `${stats.steps} engine steps (${(stats.decodedTokens / Math.max(1, stats.steps)).toFixed(1)} tokens per decode)\n`,
    );
  } finally {
    await model.dispose();
  }
}

/** `[name=]path` → { name?, path }: a '=' before any path separator ends a name; paths may contain '=' further on. */
function namedPath(flag: string, value: string): { name?: string; path: string } {
  const eq = value.indexOf('=');
  const slash = value.search(/[\\/]/);
  if (eq > 0 && (slash < 0 || eq < slash)) return { name: value.slice(0, eq), path: value.slice(eq + 1) };
  if (eq === 0) throw new UsageError(`${flag} ${JSON.stringify(value)}: the name before '=' is empty`);
  return { path: value };
}

/** `--model [name=]path` → { name, path }; the name defaults to the file name without .gguf. */
function modelSpec(value: string): ServeModelSpec {
  const { name, path } = namedPath('--model', value);
  if (name !== undefined) return { name, path };
  const base = value.split(/[\\/]/).pop() ?? value;
  return { name: base.replace(/\.gguf$/i, ''), path: value };
}

/** `--fuse NAME=MODEL:WEIGHT,MODEL:WEIGHT` → { name, members }; a model name may itself contain ':'. */
function fuseSpec(value: string): FusedModelSpec {
  const usage = `--fuse ${JSON.stringify(value)}: expected NAME=MODEL:WEIGHT,MODEL:WEIGHT (e.g. duo=chat:0.7,other:0.3)`;
  const eq = value.indexOf('=');
  if (eq <= 0 || eq === value.length - 1) throw new UsageError(usage);
  const members = value.slice(eq + 1).split(',').map((part) => {
    const colon = part.lastIndexOf(':');
    const weight = part.slice(colon + 1).trim();
    if (colon <= 0 || weight === '' || !Number.isFinite(Number(weight))) throw new UsageError(`${usage}; ${JSON.stringify(part)} is not MODEL:WEIGHT`);
    return { model: part.slice(0, colon), weight: Number(weight) };
  });
  return { name: value.slice(0, eq), members };
}

async function serveCommand(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      ...modelOptions,
      model: { type: 'string', short: 'm', multiple: true },
      host: { type: 'string' },
      port: { type: 'string' },
      'api-key': { type: 'string' },
      'max-queue': { type: 'string' },
      'max-tokens-limit': { type: 'string' },
      'max-choices': { type: 'string' },
      'body-limit': { type: 'string' },
      'drain-timeout': { type: 'string' },
      'log-level': { type: 'string' },
      'memory-budget': { type: 'string' },
      'keep-alive': { type: 'string' },
      draft: { type: 'string', multiple: true },
      'draft-max': { type: 'string' },
      fuse: { type: 'string', multiple: true },
      'expert-stats': { type: 'boolean' },
      'kv-budget': { type: 'string' },
      'kv-paged': { type: 'boolean' },
      'kv-block-size': { type: 'string' },
      'kv-swap': { type: 'string' },
      'fused-moe-routing': { type: 'boolean' },
    },
  });
  if (values.help) return void process.stdout.write(USAGE);
  const fused = (values.fuse ?? []).map(fuseSpec);
  const memoryBudget = bytes('memory-budget', values['memory-budget']);
  const keepAlive = int('keep-alive', values['keep-alive']);
  if (keepAlive !== undefined && memoryBudget === undefined) throw new UsageError('--keep-alive needs --memory-budget (models stay loaded without one)');
  let specs = (values.model ?? []).map(modelSpec);
  if (specs.length === 0) {
    const path = await ensureDefaultModel({ onProgress: (m: string) => process.stderr.write(`${m}\n`) });
    process.stderr.write(`no --model given: serving the built-in demo model ${path}\n`);
    process.stderr.write('(synthetic, RANDOM WEIGHTS: the text is noise; tokens, batching, streaming and speed are real)\n');
    specs = [{ name: 'genesis-demo', path, randomWeights: true }];
  }
  // --draft [target=]draft.gguf: speculative decoding for that model (default: the first).
  for (const value of values.draft ?? []) {
    const { name, path } = namedPath('--draft', value);
    const target = name !== undefined ? specs.find((s) => s.name === name) : specs[0];
    if (!target) throw new UsageError(`--draft ${JSON.stringify(value)}: no --model is named ${JSON.stringify(name)}`);
    const maxTokens = int('draft-max', values['draft-max']);
    target.draft = path === 'mtp' ? { mtp: true, maxTokens } : { path, maxTokens };
  }
  const { onProgress: _unused, ...load } = loadOptions(values);
  const port = int('port', values.port) ?? 8080;
  const drainTimeout = int('drain-timeout', values['drain-timeout']);
  const handle = await serve({
    models: specs,
    fused,
    load: {
      ...load,
      maxQueue: int('max-queue', values['max-queue']),
      ...(values['expert-stats'] ? { expertStats: true } : {}),
      ...(values['kv-budget'] !== undefined ? { kvBudget: int('kv-budget', values['kv-budget']) } : {}),
      ...(values['kv-paged'] ? { kvPaged: true } : {}),
      ...(values['kv-block-size'] !== undefined ? { kvBlockSize: int('kv-block-size', values['kv-block-size']) } : {}),
      ...(values['kv-swap'] !== undefined ? { kvSwapMemory: bytes('kv-swap', values['kv-swap']) } : {}),
      ...(values['fused-moe-routing'] ? { fusedMoeRouting: true } : {}),
    },
    host: values.host ?? '127.0.0.1',
    port,
    apiKey: values['api-key'] ?? process.env['GENESIS_API_KEY'],
    maxTokensLimit: int('max-tokens-limit', values['max-tokens-limit']),
    maxChoices: int('max-choices', values['max-choices']),
    bodyLimit: int('body-limit', values['body-limit']),
    drainTimeoutMs: drainTimeout === undefined ? undefined : drainTimeout * 1000,
    logLevel: values['log-level'],
    ...(memoryBudget !== undefined ? { memoryBudget, keepAlive: keepAlive === undefined ? undefined : keepAlive * 1000 } : {}),
    progress: (name) => {
      if (!process.stderr.isTTY) return undefined;
      const bar = progressBar(`loading ${name}`);
      return (fraction) => {
        bar(fraction);
        if (fraction >= 1) process.stderr.write('\n');
      };
    },
  });
  await handle.closed;
}

async function hashCommand(argv: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { model: { type: 'string', short: 'm' }, tensors: { type: 'boolean' }, json: { type: 'boolean' }, 'no-cache': { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
  });
  if (values.help) return void process.stdout.write(USAGE);
  const path = positionals[0] ?? values.model;
  if (!path) throw new UsageError('hash needs a model file: genesis hash <file.gguf>');
  const bar = process.stderr.isTTY ? progressBar('hashing') : undefined;
  const digest = await hashModel(path, { onProgress: bar, cache: !values['no-cache'] });
  if (bar) process.stderr.write('\n');
  if (values.json) {
    const { cached, ...rest } = digest;
    process.stdout.write(`${JSON.stringify(values.tensors ? { ...rest, cached } : { sha256: rest.sha256, cached })}\n`);
    return;
  }
  // The layout of `llama-gguf-hash --sha256`: per-tensor lines `sha256  <hex>  <file>:<tensor>`, then the model.
  if (values.tensors) for (const t of digest.tensors) process.stdout.write(`sha256    ${t.sha256}  ${path}:${t.name}\n`);
  process.stdout.write(`sha256    ${digest.sha256}  ${path}\n`);
}

function readReceipt(file: string): ReceiptEnvelope {
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as ReceiptEnvelope;
  } catch (error) {
    throw new UsageError(`cannot read the receipt ${file}: ${(error as Error).message}`);
  }
}

async function verifyCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { model: { type: 'string', short: 'm' }, 'public-key': { type: 'string' }, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (!positionals[0]) throw new UsageError('verify needs a receipt file: genesis verify <receipt.json>');
  const envelope = readReceipt(positionals[0]);
  let publicKey: string | undefined;
  if (values['public-key']) {
    try {
      publicKey = readFileSync(values['public-key'], 'utf8');
    } catch (error) {
      throw new UsageError(`cannot read --public-key: ${(error as Error).message}`);
    }
  }
  const check = await verifyReceipt(envelope, { modelPath: values.model, publicKey });
  if (values.json) {
    process.stdout.write(`${JSON.stringify({ valid: check.valid, reasons: check.reasons, keyId: check.keyId })}\n`);
  } else if (check.valid) {
    const s = check.statement!;
    process.stdout.write(
      `valid: signed by key ${check.keyId}${publicKey ? '' : ' (the key named in the receipt: compare it with the one you trust)'}\n` +
        `model ${s.model.fileName} sha256 ${s.model.sha256}${values.model ? ' (matches the file)' : ''}\n` +
        `${s.prompt.count} prompt tokens, ${s.output.count} output tokens (${s.output.finishReason}), sampler ${s.sampler.chain.join(' > ')}, seed ${s.sampler.seed}\n`,
    );
  } else {
    process.stdout.write('invalid:\n');
    for (const r of check.reasons) process.stdout.write(`  ${r.code}: ${r.message}\n`);
  }
  return check.valid ? 0 : 1;
}

async function replayCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args: argv, allowPositionals: true, options: { ...modelOptions } });
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (!positionals[0]) throw new UsageError('replay needs a receipt file: genesis replay <receipt.json> --model <file.gguf>');
  if (!values.model) throw new UsageError('replay needs --model <file.gguf>');
  const statement = decodeReceipt(readReceipt(positionals[0]));
  const needed = (statement.prompt?.count ?? 0) + Math.max(statement.output?.count ?? 0, statement.sampler?.params?.maxTokens ?? 0) + 1;
  const model = await open(values.model, { ...loadOptions(values), maxSequences: 1, contextSize: int('context-size', values['context-size']) ?? Math.max(needed, 256) });
  try {
    const report = await replayReceipt(model, statement);
    if (!report.modelDigestMatches) process.stderr.write(`note: ${values.model} is not the model named in the receipt (sha256 ${statement.model.sha256})\n`);
    if (report.identical) {
      process.stdout.write(`identical: ${report.tokens.length} output tokens\n`);
      return 0;
    }
    const d = report.firstDivergence;
    process.stdout.write(
      d ? `divergent at token ${d.index}: receipt ${d.expected ?? 'none'}, replay ${d.actual ?? 'none'}\n` : 'divergent: the output token hash differs\n',
    );
    return 1;
  } finally {
    await model.dispose();
  }
}

async function rpcServerCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      host: { type: 'string' },
      port: { type: 'string', short: 'p' },
      device: { type: 'string', short: 'd', multiple: true },
      threads: { type: 'string', short: 't' },
      cache: { type: 'string', short: 'c' },
      'allow-remote': { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) return void process.stdout.write(USAGE), 0;
  const host = values.host ?? '127.0.0.1';
  if (!isLoopback(host) && !values['allow-remote']) {
    throw new UsageError(
      `refusing to listen on ${host}: the RPC protocol has no authentication, so anyone who reaches the port can read and write the served memory. ` +
        'Pass --allow-remote to do it anyway, on a network you trust.',
    );
  }
  if (!isLoopback(host)) {
    process.stderr.write(`WARNING: listening on ${host}: the RPC protocol has no authentication or encryption; allow only trusted machines to reach this port.\n`);
  }
  const server = await startRpcServer({
    host,
    port: int('port', values.port),
    threads: int('threads', values.threads),
    devices: values.device?.flatMap((d) => d.split(',')).filter(Boolean),
    cacheDir: values.cache,
    allowRemote: values['allow-remote'],
  });
  const mib = (n: number) => `${(n / 2 ** 20).toFixed(0)} MiB`;
  process.stderr.write(
    `genesis rpc-server: listening on ${server.endpoint}, serving ${server.devices.map((d) => `${d.name} (${d.description}, ${mib(d.free)} free of ${mib(d.total)})`).join(', ')}\n` +
      `  load a model with --rpc ${server.endpoint} (CLI) or rpcServers: ['${server.endpoint}'] (API); Ctrl-C stops it\n`,
  );
  await server.stopped;
  return 0;
}

export async function main(argv = process.argv.slice(2)): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'generate':
        await generateCommand(rest);
        return 0;
      case 'info':
        await infoCommand(rest);
        return 0;
      case 'demo':
        await demoCommand(rest);
        return 0;
      case 'serve':
        await serveCommand(rest);
        return 0;
      case 'hash':
        await hashCommand(rest);
        return 0;
      case 'verify':
        return await verifyCommand(rest);
      case 'replay':
        return await replayCommand(rest);
      case 'bench':
        return await benchCommand(rest);
      case 'plan':
        await planCommand(rest);
        return 0;
      case 'fingerprint':
        return await fingerprintCommand(rest);
      case 'rpc-server':
        return await rpcServerCommand(rest);
      case undefined:
      case '-h':
      case '--help':
      case 'help':
        process.stdout.write(USAGE);
        return command === undefined ? 1 : 0;
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}`);
    }
  } catch (error) {
    if (error instanceof UsageError || (error as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      process.stderr.write(`genesis: ${(error as Error).message}\n\n${USAGE}`);
      return 2;
    }
    if (error instanceof ServerConfigError) {
      process.stderr.write(`genesis: ${error.message}\n`);
      return 2;
    }
    if ((error as { code?: string }).code === 'EADDRINUSE' || (error as { code?: string }).code === 'EACCES') {
      process.stderr.write(`genesis: cannot listen: ${(error as Error).message}\n`);
      return 1;
    }
    if (error instanceof GenesisError) {
      process.stderr.write(`genesis: ${error.code}: ${error.message}\n`);
      return 1;
    }
    throw error;
  }
}

main().then((code) => {
  process.exitCode = code;
});
