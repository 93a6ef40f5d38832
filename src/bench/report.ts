/**
 * Renders a BenchReport as markdown (what the harness prints and commits) and as one self-contained
 * HTML file with Chart.js inlined, so the report opens from disk with no network.
 *
 * Both renderers walk the same list of blocks (headings, facts, tables, notes), so the markdown and
 * the HTML always show the same figures; the HTML adds the charts. Every string from the report
 * (model names, paths, error messages) is escaped for the format it lands in.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import type { ChartConfiguration } from 'chart.js';
import type { BenchModelRun, BenchReport, FusionBenchResult, LoadStats, Percentiles, RatioRow } from './types.js';

// ---------------------------------------------------------------------------------------------
// Number formatting

/** `x` with `digits` decimals; '—' for a missing or NaN figure (JSON turns NaN and ±Infinity into null). */
function fixed(x: number | null | undefined, digits: number): string {
  if (x === null || x === undefined || Number.isNaN(x)) return '—';
  if (!Number.isFinite(x)) return x > 0 ? '∞' : '-∞';
  return x.toFixed(digits);
}

const tps = (x: number | null | undefined) => fixed(x, 1);
const ms = (x: number | null | undefined) => fixed(x, 1);
const ratio = (x: number | null | undefined) => fixed(x, 2);

/** A ratio-table value: tokens/s and milliseconds with 1 decimal, anything else with 2. */
function formatValue(x: number, unit: string): string {
  return /^(ms|s)$|tokens\/s|t\/s/.test(unit) ? fixed(x, 1) : fixed(x, 2);
}

function binaryBytes(bytes: number): string {
  if (!Number.isFinite(bytes)) return '—';
  if (bytes >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
  if (bytes >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  return `${bytes} B`;
}

function count(n: number): string {
  if (!Number.isFinite(n)) return '—';
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} K`;
  return String(n);
}

function duration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '—';
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h} h ${m} min ${s % 60} s` : `${m} min ${s % 60} s`;
}

/** Whether a ratio meets its target; float noise (0.8999999999 against 0.9) does not fail it. */
function meets(row: RatioRow): boolean | undefined {
  if (row.target === undefined || row.target === null) return undefined;
  if (row.failed) return false;
  return row.ratio >= row.target - 1e-9;
}

const OURS = 'genesis';
const SERVER_REF = 'llama-server';

// ---------------------------------------------------------------------------------------------
// The document both renderers walk

type Align = 'left' | 'right';

interface Table {
  head: string[];
  align: Align[];
  rows: string[][];
}

type ChartKind = 'throughput' | 'ttft' | 'tpot' | 'ratio' | 'roofline';

interface ChartSlot {
  /** Canvas id, stable: `chart-<kind>-<model index>`, or `chart-ratio-other` for ratio rows naming no run. */
  id: string;
  kind: ChartKind;
  /** Index into report.runs; -1 for the chart of ratio rows that name no run. */
  model: number;
  title: string;
  /** Canvas height in px where the default (320) does not fit. */
  height?: number;
  config: ChartConfiguration;
}

type Block =
  | { kind: 'heading'; level: 1 | 2 | 3; text: string; id?: string }
  | { kind: 'facts'; items: Array<[label: string, value: string]> }
  | { kind: 'note'; text: string }
  | { kind: 'path'; text: string }
  | { kind: 'table'; table: Table }
  | { kind: 'charts'; charts: ChartSlot[] }
  | { kind: 'heatmap'; rows: HeatmapRow[] };

/** One MoE layer of the expert-load heatmap: each expert's tokens over the layer's mean (1 = even). */
interface HeatmapRow {
  label: string;
  loads: number[];
}

/** Load over the mean → a shade, in markdown: nothing, under ½, under 1, under 2, under 4, 4 and over. */
const HEAT_SHADES = [' ', '·', '░', '▒', '▓', '█'];
function heatShade(load: number): number {
  if (!(load > 0)) return 0;
  return load < 0.5 ? 1 : load < 1 ? 2 : load < 2 ? 3 : load < 4 ? 4 : 5;
}

function heatmapRows(layers: Array<{ layer: number; counts: number[] }>): HeatmapRow[] {
  return layers.map(({ layer, counts }) => {
    const mean = counts.reduce((a, b) => a + b, 0) / Math.max(1, counts.length);
    return { label: `layer ${layer}`, loads: counts.map((c) => (mean > 0 ? c / mean : 0)) };
  });
}

function table(columns: Array<[head: string, align: Align]>, rows: string[][]): Table {
  return { head: columns.map((c) => c[0]), align: columns.map((c) => c[1]), rows };
}

function headerFacts(report: BenchReport): Array<[string, string]> {
  const { machine, device, settings: s } = report;
  const bandwidth = device.bandwidthBytesPerSecond;
  return [
    ['Date', report.date],
    ['Duration', duration(report.durationSeconds)],
    ['Machine', `${machine.host} · ${machine.os} · ${machine.cpu} (${machine.cores} cores) · ${binaryBytes(machine.memoryBytes)} memory`],
    [
      'Device',
      `${device.name} (${device.variant})` + (bandwidth !== undefined && bandwidth !== null ? ` · measured bandwidth ${fixed(bandwidth / 1e9, 1)} GB/s` : ''),
    ],
    ['Commit', report.commit ?? 'unknown'],
    ['llama.cpp commit', report.llamaCommit],
    [
      'Settings',
      [
        s.quick ? 'quick run' : 'full run',
        `threads ${s.threads}`,
        `batch size ${s.batchSize}`,
        `GPU layers ${s.gpuLayers}`,
        ...(s.split?.rpcServers?.length ? [`RPC servers ${s.split.rpcServers.join(', ')}`] : []),
        ...(s.split?.splitMode ? [`split mode ${s.split.splitMode}`] : []),
        ...(s.split?.tensorSplit?.length ? [`tensor split ${s.split.tensorSplit.join(':')}`] : []),
        ...(s.split?.mainGpu !== undefined ? [`main device ${s.split.mainGpu}`] : []),
        `best of ${s.repeat} interleaved rounds`,
        `concurrency ${s.concurrency.join(', ')}`,
        ...(s.ppTokens.length ? [`pp ${s.ppTokens.join(', ')}`] : []),
        `tg ${s.tgTokens}`,
        ...(s.kvPaged ? [`our server with paged attention (--kv-paged${s.kvBlockSize ? ` --kv-block-size ${s.kvBlockSize}` : ''})`] : []),
        ...(s.kvSwapMemory ? [`ours copies preempted sequences' KV to host memory (--kv-swap ${s.kvSwapMemory})`] : []),
        ...(s.fusedMoeRouting ? ['ours with fused group-limited MoE routing (--fused-moe-routing)'] : []),
      ].join(' · '),
    ],
  ];
}

function shapeTable(run: BenchModelRun): Table {
  const sh = run.shape;
  const columns: Array<[string, Align]> = [
    ['preset', 'left'],
    ['arch', 'left'],
    ['type', 'left'],
    ['layers', 'right'],
    ['embd', 'right'],
    ['heads / kv heads / head dim', 'right'],
  ];
  const row = [sh.preset, sh.arch, sh.type, String(sh.nLayer), String(sh.nEmbd), `${sh.nHead} / ${sh.nHeadKv} / ${sh.headDim}`];
  if (sh.nFf !== undefined) {
    columns.push(['ff', 'right']);
    row.push(String(sh.nFf));
  }
  if (sh.nExpert !== undefined) {
    columns.push(['experts', 'right']);
    const details = [sh.nExpertUsed !== undefined ? `${sh.nExpertUsed} used` : '', sh.nFfExp !== undefined ? `ff ${sh.nFfExp}` : ''].filter(Boolean);
    row.push(`${sh.nExpert}${details.length ? ` (${details.join(', ')})` : ''}`);
  }
  columns.push(['vocab', 'right'], ['params', 'right'], ['file size', 'right']);
  row.push(String(sh.vocabSize), count(sh.params), binaryBytes(sh.fileBytes));
  return table(columns, [row]);
}

function percentileCells(p: Percentiles | undefined): string[] {
  return [ms(p?.p50), ms(p?.p90), ms(p?.p99)];
}

const LOAD_COLUMNS: Array<[string, Align]> = [
  ['server', 'left'],
  ['completed', 'right'],
  ['output t/s', 'right'],
  ['req/s', 'right'],
  ['TTFT p50', 'right'],
  ['TTFT p90', 'right'],
  ['TTFT p99', 'right'],
  ['TPOT p50', 'right'],
  ['TPOT p90', 'right'],
  ['TPOT p99', 'right'],
  ['errors', 'right'],
];

function loadCells(server: string, s: LoadStats): string[] {
  return [
    server,
    `${s.completed}/${s.requests}`,
    tps(s.outputTokensPerSecond),
    fixed(s.requestsPerSecond, 2),
    ...percentileCells(s.ttftMs),
    ...percentileCells(s.tpotMs),
    String(s.errors),
  ];
}

/** A note per run that had errors: its figures are suspect, and the first message says why. */
function errorNotes(where: string, pairs: Array<[server: string, stats: LoadStats]>): Block[] {
  return pairs
    .filter(([, s]) => s.errors > 0)
    .map(([server, s]) => ({
      kind: 'note' as const,
      text: `${server}${where}: ${s.errors} of ${s.requests} requests failed` + (s.firstError ? `; first error: ${s.firstError}` : ''),
    }));
}

function modelBlocks(run: BenchModelRun, index: number, charts: ChartSlot[]): Block[] {
  const blocks: Block[] = [
    { kind: 'heading', level: 2, text: `Model: ${run.name}`, id: `model-${index}` },
    { kind: 'path', text: run.path },
    { kind: 'table', table: shapeTable(run) },
  ];
  if (charts.length) blocks.push({ kind: 'charts', charts });

  if (run.single.length) {
    blocks.push({ kind: 'heading', level: 3, text: 'Single stream (vs llama-bench)' });
    blocks.push({
      kind: 'table',
      table: table(
        [['test', 'left'], [`${OURS} t/s`, 'right'], ['llama-bench t/s', 'right'], ['ratio', 'right']],
        run.single.map((r) => [`${r.test}${r.tokens}`, tps(r.ours), tps(r.reference), ratio(r.ours / r.reference)]),
      ),
    });
  }

  if (run.batched.length) {
    blocks.push({ kind: 'heading', level: 3, text: 'Batched decoding (vs llama-batched-bench)' });
    blocks.push({
      kind: 'table',
      table: table(
        [
          ['B', 'right'],
          ['prompt', 'right'],
          ['gen', 'right'],
          [`${OURS} gen t/s`, 'right'],
          ['llama-batched-bench gen t/s', 'right'],
          ['gen ratio', 'right'],
          [`${OURS} total t/s`, 'right'],
          ['llama-batched-bench total t/s', 'right'],
          ['total ratio', 'right'],
        ],
        run.batched.map((r) => [
          String(r.concurrency),
          String(r.promptTokens),
          String(r.genTokens),
          tps(r.ours),
          tps(r.reference),
          ratio(r.ours / r.reference),
          tps(r.oursTotal),
          tps(r.referenceTotal),
          ratio(r.oursTotal / r.referenceTotal),
        ]),
      ),
    });
  }

  if (run.latency.length) {
    blocks.push({ kind: 'heading', level: 3, text: 'Server latency (vs llama-server)' });
    blocks.push({ kind: 'note', text: 'Latencies in ms. TTFT: time to first token; TPOT: time per output token after the first.' });
    blocks.push({
      kind: 'table',
      table: table(
        [['B', 'right'], ['prompt', 'right'], ['gen', 'right'], ...LOAD_COLUMNS],
        run.latency.flatMap((r) => {
          const lead = [String(r.concurrency), String(r.promptTokens), String(r.genTokens)];
          return [
            [...lead, ...loadCells(OURS, r.ours)],
            [...lead, ...loadCells(SERVER_REF, r.reference)],
          ];
        }),
      ),
    });
    for (const r of run.latency) {
      blocks.push(...errorNotes(` at B=${r.concurrency}`, [[OURS, r.ours], [SERVER_REF, r.reference]]));
    }
  }

  const sp = run.sharedPrefix;
  if (sp) {
    blocks.push({ kind: 'heading', level: 3, text: 'Shared prefix (vs llama-server)' });
    blocks.push({
      kind: 'note',
      text:
        `${sp.requests} requests at concurrency ${sp.concurrency}: a ${sp.prefixTokens}-token shared prefix, ` +
        `a ${sp.suffixTokens}-token suffix each, ${sp.genTokens} tokens generated. Latencies in ms.`,
    });
    blocks.push({ kind: 'table', table: table(LOAD_COLUMNS, [loadCells(OURS, sp.ours), loadCells(SERVER_REF, sp.reference)]) });
    blocks.push(...errorNotes('', [[OURS, sp.ours], [SERVER_REF, sp.reference]]));
    const pc = sp.prefixCache;
    if (pc) {
      blocks.push({
        kind: 'note',
        text: `One request alone with a ${sp.prefixTokens}-token prefix nothing holds (cold), then one with the same prefix and another suffix (cached): time to first token in ms.`,
      });
      const row = (who: string, t: { coldMs: number; cachedMs: number }) => [who, fixed(t.coldMs, 1), fixed(t.cachedMs, 1), t.coldMs > 0 ? fixed(t.cachedMs / t.coldMs, 3) : '—'];
      blocks.push({
        kind: 'table',
        table: table([['server', 'left'], ['cold TTFT', 'right'], ['cached TTFT', 'right'], ['cached / cold', 'right']], [row(OURS, pc.ours), row(SERVER_REF, pc.reference)]),
      });
    }
  }

  const mx = run.mixed;
  if (mx) {
    blocks.push({ kind: 'heading', level: 3, text: 'Mixed workload (vs llama-server)' });
    blocks.push({
      kind: 'note',
      text:
        `${mx.requests} requests, Poisson arrivals at ${fixed(mx.arrivalRate, 2)} req/s, prompts ${mx.promptTokens[0]}–${mx.promptTokens[1]} tokens, ` +
        `${mx.genTokens[0]}–${mx.genTokens[1]} tokens generated, seed ${mx.seed}. Latencies in ms.`,
    });
    blocks.push({ kind: 'table', table: table(LOAD_COLUMNS, [loadCells(OURS, mx.ours), loadCells(SERVER_REF, mx.reference)]) });
    blocks.push(...errorNotes('', [[OURS, mx.ours], [SERVER_REF, mx.reference]]));
  }

  if (run.kvPool) {
    const k = run.kvPool;
    blocks.push({ kind: 'heading', level: 3, text: 'Sequences in one KV budget (vs llama-server per-sequence slots)' });
    blocks.push({
      kind: 'note',
      text:
        `${k.budgetTokens} KV tokens, requests up to ${k.maxContext} tokens of context: llama-server gets ${k.referenceSequences} slots of ${k.maxContext}; ` +
        `ours one pool of ${k.budgetTokens} (--kv-budget). ${k.requests} requests of ${k.promptTokens} + ${k.genTokens} tokens, ${k.concurrency} at a time.` +
        (k.oursPreemptions !== undefined ? ` Ours preempted ${k.oursPreemptions} sequences for room${k.oursSwapIns ? `, ${k.oursSwapIns} of them copied back from host memory (--kv-swap)` : ''}.` : ''),
    });
    blocks.push({
      kind: 'table',
      table: table(
        [
          ['server', 'left'],
          ['sequences at once', 'right'],
          ['output t/s', 'right'],
          ['TTFT p50 (ms)', 'right'],
          ['errors', 'right'],
        ],
        [
          [OURS, String(k.oursSequences), tps(k.ours.outputTokensPerSecond), fixed(k.ours.ttftMs.p50, 1), String(k.ours.errors)],
          [SERVER_REF, String(k.referenceSequences), tps(k.reference.outputTokensPerSecond), fixed(k.reference.ttftMs.p50, 1), String(k.reference.errors)],
        ],
      ),
    });
  }
  if (run.routing) {
    const r = run.routing;
    blocks.push({ kind: 'heading', level: 3, text: 'Fused MoE routing (fusedMoeRouting on vs off)' });
    blocks.push(onOffTable('', r.promptTokens, r.genTokens, r.rows.map((x) => ({ concurrency: x.concurrency, on: x.fusedOn, off: x.fusedOff }))));
  }
  if (run.experts) {
    const e = run.experts;
    blocks.push({ kind: 'heading', level: 3, text: 'Expert load (expert statistics on vs off)' });
    blocks.push(onOffTable('statistics ', e.promptTokens, e.genTokens, [{ concurrency: e.concurrency, on: e.statsOn, off: e.statsOff }]));
    if (e.layers.length) {
      blocks.push({
        kind: 'note',
        text:
          `Tokens routed to each expert in the counted run, per layer, over the layer's mean (one column per expert, ${e.layers[0]!.counts.length} experts): ` +
          `'${HEAT_SHADES[1]}' under 0.5, '${HEAT_SHADES[2]}' under 1, '${HEAT_SHADES[3]}' under 2, '${HEAT_SHADES[4]}' under 4, '${HEAT_SHADES[5]}' 4 or more, blank none. ` +
          'Random weights route near evenly; real models show their hot experts here.',
      });
      blocks.push({ kind: 'heatmap', rows: heatmapRows(e.layers) });
    }
  }
  if (run.roofline?.length) {
    blocks.push({ kind: 'heading', level: 3, text: 'Roofline (decode against measured bandwidth)' });
    blocks.push({
      kind: 'note',
      text: 'Ideal: steps per second if each decode step only had to read its weights at the measured bandwidth, times B.',
    });
    blocks.push({
      kind: 'table',
      table: table(
        [
          ['B', 'right'],
          ['experts/layer', 'right'],
          ['weights/step (MB)', 'right'],
          ['ideal t/s', 'right'],
          ['measured t/s', 'right'],
          ['fraction', 'right'],
        ],
        run.roofline.map((r) => [
          String(r.concurrency),
          r.expertsPerLayer > 0 ? fixed(r.expertsPerLayer, 1) : '—',
          fixed(r.weightBytesPerStep / 1e6, 1),
          tps(r.idealTokensPerSecond),
          tps(r.measuredTokensPerSecond),
          `${fixed(r.fraction * 100, 1)}%`,
        ]),
      ),
    });
  }
  return blocks;
}

/** Decode throughput of one feature off and on, per batch size (the experts and routing workloads). */
function onOffTable(what: string, promptTokens: number, genTokens: number, rows: Array<{ concurrency: number; on: number; off: number }>): Block {
  return {
    kind: 'table',
    table: table(
      [
        ['B', 'right'],
        ['prompt', 'right'],
        ['gen', 'right'],
        [`${what}off t/s`, 'right'],
        [`${what}on t/s`, 'right'],
        ['on / off', 'right'],
      ],
      rows.map((x) => [String(x.concurrency), String(promptTokens), String(genTokens), tps(x.off), tps(x.on), x.off > 0 ? fixed(x.on / x.off, 3) : '—']),
    ),
  };
}

const RATIO_COLUMNS: Array<[string, Align]> = [
  ['model', 'left'],
  ['workload', 'left'],
  ['test', 'left'],
  ['metric', 'left'],
  [OURS, 'right'],
  ['reference (tool)', 'right'],
  ['ratio', 'right'],
  ['target', 'right'],
  ['met?', 'left'],
];

/** Decimals that show a missed target as missed: 0.898 against 0.9 reads 0.898, not 0.90. */
function missDigits(value: number, target: number): number {
  let digits = 2;
  while (digits < 4 && Number(value.toFixed(digits)) >= target) digits++;
  return digits;
}

function metricLabel(r: RatioRow): string {
  return !r.unit || r.metric.endsWith(r.unit) ? r.metric : `${r.metric} (${r.unit})`;
}

function ratioRows(ratios: RatioRow[]): string[][] {
  return ratios.map((r) => {
    const met = meets(r);
    return [
      r.model,
      r.workload,
      r.label,
      metricLabel(r),
      formatValue(r.ours, r.unit),
      `${formatValue(r.reference, r.unit)} (${r.referenceTool})`,
      fixed(r.ratio, met === false && !r.failed ? missDigits(r.ratio, r.target as number) : 2),
      met === undefined ? '' : ratio(r.target),
      (met === undefined ? '' : met ? '✓' : '✗') + (r.failed ? `${met === undefined ? '' : ' '}(failed requests: ${r.failed.ours} ours, ${r.failed.reference} reference)` : ''),
    ];
  });
}

/** `genesis bench --fusion`: both members alone, both at the same time, fused, and the ratio. */
function fusionBlocks(r: FusionBenchResult): Block[] {
  return [
    { kind: 'heading', level: 2, text: 'Logit fusion overhead', id: 'fusion' },
    {
      kind: 'facts',
      items: [
        ['Members', `A ${r.a}, B ${r.b} (same tokenizer, ${count(r.vocabSize)} tokens)`],
        ['Weights', r.weights.join(' / ')],
        ['Generation', `${r.genTokens} tokens per stream, greedy, ${r.threads} thread${r.threads === 1 ? '' : 's'} per model`],
        ['Offload', r.offload.length ? `${r.offload.join(', ')} (${r.gpuLayers} GPU layers)` : 'none: CPU only'],
      ],
    },
    {
      kind: 'note',
      text:
        'Generated tokens/s, submit to last token, best of the rounds. "Separately" runs the streams on A and on B at the same time ' +
        '(the decode work of fusion) and counts per model; overhead = fused / separately (1: fusion costs nothing beyond running both models).',
    },
    {
      kind: 'table',
      table: table(
        [['streams', 'right'], ['A alone t/s', 'right'], ['B alone t/s', 'right'], ['A and B separately t/s (per model)', 'right'], ['fused A+B t/s', 'right'], ['overhead', 'right']],
        r.rows.map((row) => [String(row.streams), tps(row.a), tps(row.b), tps(row.separately), tps(row.fused), ratio(row.overhead)]),
      ),
    },
  ];
}

function documentBlocks(report: BenchReport, withCharts: boolean): Block[] {
  const blocks: Block[] = [
    { kind: 'heading', level: 1, text: `Genesis Runtime benchmark — ${report.date}` },
    { kind: 'facts', items: headerFacts(report) },
  ];
  report.runs.forEach((run, i) => blocks.push(...modelBlocks(run, i, withCharts ? modelCharts(report, run, i) : [])));
  if (report.fusion) blocks.push(...fusionBlocks(report.fusion));
  // A report of one separate measurement (--fusion) has no runs against references, so no ratios.
  if (report.runs.length === 0 && report.ratios.length === 0) return blocks;
  blocks.push({ kind: 'heading', level: 2, text: 'Ratios', id: 'ratios' });
  blocks.push({
    kind: 'note',
    text: 'ratio = ours / reference for throughput, reference / ours for latency: above 1 is better than the reference either way.',
  });
  if (withCharts) {
    const names = new Set(report.runs.map((r) => r.name));
    const other = report.ratios.filter((r) => !names.has(r.model));
    if (other.length) blocks.push({ kind: 'charts', charts: [ratioChart('chart-ratio-other', -1, 'Ratio to reference (other rows)', other)] });
  }
  blocks.push({ kind: 'table', table: table(RATIO_COLUMNS, ratioRows(report.ratios)) });
  return blocks;
}

// ---------------------------------------------------------------------------------------------
// Charts: Chart.js configurations, built here and embedded as JSON; the page only instantiates them.

const BLUE = '#1f6fb4';
const ORANGE = '#e07b19';
const GREEN = '#2e9e4f';
const RED = '#d0443e';
const GREY = '#9aa3ad';
/** Dash patterns for p50, p90, p99. */
const DASHES: number[][] = [[], [6, 4], [2, 3]];

function categoryAxes(xTitle: string, yTitle: string) {
  return {
    x: { type: 'category' as const, title: { display: true, text: xTitle } },
    y: { type: 'linear' as const, beginAtZero: true, title: { display: true, text: yTitle } },
  };
}

/** Sorted distinct concurrency values, the x categories of the concurrency charts. */
function concurrencies(...lists: Array<Array<{ concurrency: number }> | undefined>): number[] {
  return [...new Set(lists.flatMap((l) => (l ?? []).map((r) => r.concurrency)))].sort((a, b) => a - b);
}

/** Values aligned to `xs`, null where a concurrency has no row (the line spans the gap). */
function aligned<R extends { concurrency: number }>(xs: number[], rows: R[], pick: (r: R) => number): Array<number | null> {
  return xs.map((x) => {
    const row = rows.find((r) => r.concurrency === x);
    const v = row ? pick(row) : undefined;
    return v === undefined || v === null || !Number.isFinite(v) ? null : v;
  });
}

function line(label: string, color: string, data: Array<number | null>, dash: number[] = []) {
  return { type: 'line' as const, label, data, borderColor: color, backgroundColor: color, borderDash: dash, spanGaps: true, tension: 0 };
}

function throughputChart(run: BenchModelRun, i: number): ChartSlot | undefined {
  if (!run.batched.length && !run.latency.length) return undefined;
  const xs = concurrencies(run.batched, run.latency);
  const datasets: Array<ReturnType<typeof line>> = [];
  if (run.batched.length) {
    datasets.push(line(`${OURS} (batched decode, gen t/s)`, BLUE, aligned(xs, run.batched, (r) => r.ours)));
    datasets.push(line('llama-batched-bench (gen t/s)', ORANGE, aligned(xs, run.batched, (r) => r.reference)));
  }
  if (run.latency.length) {
    datasets.push(line(`${OURS} server (output t/s)`, BLUE, aligned(xs, run.latency, (r) => r.ours.outputTokensPerSecond), [6, 4]));
    datasets.push(line('llama-server (output t/s)', ORANGE, aligned(xs, run.latency, (r) => r.reference.outputTokensPerSecond), [6, 4]));
  }
  return {
    id: `chart-throughput-${i}`,
    kind: 'throughput',
    model: i,
    title: 'Throughput vs concurrency',
    config: {
      type: 'line',
      data: { labels: xs.map(String), datasets },
      options: { scales: categoryAxes('concurrency (B)', 'tokens/s') },
    },
  };
}

function latencyChart(run: BenchModelRun, i: number, which: 'ttft' | 'tpot'): ChartSlot | undefined {
  if (!run.latency.length) return undefined;
  const xs = concurrencies(run.latency);
  const name = which === 'ttft' ? 'TTFT' : 'TPOT';
  const pick = (s: LoadStats) => (which === 'ttft' ? s.ttftMs : s.tpotMs);
  const datasets: Array<ReturnType<typeof line>> = [];
  for (const [server, color, side] of [[OURS, BLUE, 'ours'], [SERVER_REF, ORANGE, 'reference']] as const) {
    (['p50', 'p90', 'p99'] as const).forEach((p, k) => {
      datasets.push(line(`${server} ${p}`, color, aligned(xs, run.latency, (r) => pick(r[side])?.[p]), DASHES[k]));
    });
  }
  return {
    id: `chart-${which}-${i}`,
    kind: which,
    model: i,
    title: `${name} percentiles vs concurrency`,
    config: {
      type: 'line',
      data: { labels: xs.map(String), datasets },
      options: { scales: categoryAxes('concurrency (B)', `${name} (ms)`) },
    },
  };
}

function ratioChart(id: string, model: number, title: string, rows: RatioRow[]): ChartSlot {
  const labels = rows.map((r) => `${r.workload} ${r.label} ${r.metric}`);
  const finite = (x: number | undefined) => (x === undefined || x === null || !Number.isFinite(x) ? null : x);
  // One bar dataset per verdict, each null outside its rows and not grouped, so every row keeps one
  // centred bar and the legend names the colours.
  const groups = [
    { label: 'meets target', color: GREEN, verdict: true },
    { label: 'misses target', color: RED, verdict: false },
    { label: 'no target', color: GREY, verdict: undefined },
  ] as const;
  const datasets: ChartConfiguration<'bar' | 'line'>['data']['datasets'] = groups
    .filter((g) => rows.some((r) => meets(r) === g.verdict))
    .map((g) => ({
      type: 'bar' as const,
      label: g.label,
      data: rows.map((r) => (meets(r) === g.verdict ? finite(r.ratio) : null)),
      backgroundColor: g.color,
      grouped: false,
    }));
  datasets.push({ type: 'line', label: 'parity (1.0)', data: rows.map(() => 1), borderColor: '#444', borderDash: [6, 4], borderWidth: 1, pointRadius: 0 });
  if (rows.some((r) => meets(r) !== undefined)) {
    datasets.push({
      type: 'line',
      label: 'target',
      data: rows.map((r) => finite(r.target)),
      showLine: false,
      pointStyle: 'line',
      pointRotation: 90,
      pointRadius: 9,
      borderWidth: 3,
      borderColor: '#1d2228',
      backgroundColor: '#1d2228',
    });
  }
  return {
    id,
    kind: 'ratio',
    model,
    title,
    // Horizontal bars, so the row labels read across; the chart grows with the rows.
    height: 90 + 22 * rows.length,
    config: {
      type: 'bar',
      data: { labels, datasets },
      options: {
        indexAxis: 'y',
        scales: {
          y: { type: 'category', ticks: { autoSkip: false } },
          x: { type: 'linear', beginAtZero: true, title: { display: true, text: 'ratio (> 1: better than the reference)' } },
        },
      },
    },
  };
}

function rooflineChart(run: BenchModelRun, i: number): ChartSlot | undefined {
  const rows = run.roofline;
  if (!rows?.length) return undefined;
  const xs = concurrencies(rows);
  const axes = categoryAxes('concurrency (B)', '% of weight-read roofline');
  return {
    id: `chart-roofline-${i}`,
    kind: 'roofline',
    model: i,
    title: 'Roofline fraction vs concurrency',
    config: {
      type: 'line',
      data: { labels: xs.map(String), datasets: [line('measured / ideal decode t/s (%)', BLUE, aligned(xs, rows, (r) => Number((r.fraction * 100).toFixed(2))))] },
      options: { scales: { x: axes.x, y: { ...axes.y, suggestedMax: 100 } } },
    },
  };
}

function modelCharts(report: BenchReport, run: BenchModelRun, i: number): ChartSlot[] {
  const ratios = report.ratios.filter((r) => r.model === run.name);
  return [
    throughputChart(run, i),
    latencyChart(run, i, 'ttft'),
    latencyChart(run, i, 'tpot'),
    ratios.length ? ratioChart(`chart-ratio-${i}`, i, 'Ratio to reference', ratios) : undefined,
    rooflineChart(run, i),
  ].filter((c): c is ChartSlot => c !== undefined);
}

// ---------------------------------------------------------------------------------------------
// Markdown

/**
 * Text for a markdown line or table cell: `|` would end the cell, `<` could open raw HTML, and
 * `*`, `` ` ``, `[`, `]` and word-edge `_` would start inline markup. A backslash is doubled only
 * where it would escape what follows (before ASCII punctuation), so Windows paths read as written.
 */
function mdText(s: string): string {
  return String(s)
    .replace(/\r?\n|\r/g, ' ')
    .replace(/\\(?=[!-/:-@[-`{-~])/g, '\\\\')
    .replace(/[|*`[\]]/g, '\\$&')
    .replace(/(^|\W)_|_(?=\W|$)/g, (m) => m.replace('_', '\\_'))
    .replace(/&(?=#?\w+;)/g, '&amp;')
    .replace(/</g, '&lt;');
}

/** A code span that no backtick run inside `s` can close. */
function mdCode(s: string): string {
  const text = String(s).replace(/\r?\n|\r/g, ' ');
  const longest = Math.max(0, ...(text.match(/`+/g) ?? []).map((m) => m.length));
  const fence = '`'.repeat(longest + 1);
  const pad = text.startsWith('`') || text.endsWith('`') ? ' ' : '';
  return `${fence}${pad}${text}${pad}${fence}`;
}

function mdTable(t: Table): string {
  const row = (cells: string[]) => `| ${cells.map(mdText).join(' | ')} |`;
  const rule = `|${t.align.map((a) => (a === 'right' ? '---:' : '---')).join('|')}|`;
  return [row(t.head), rule, ...t.rows.map(row)].join('\n');
}

function mdBlock(b: Block): string {
  switch (b.kind) {
    case 'heading':
      return `${'#'.repeat(b.level)} ${mdText(b.text)}`;
    case 'facts':
      return b.items.map(([k, v]) => `- **${mdText(k)}:** ${mdText(v)}`).join('\n');
    case 'note':
      return mdText(b.text);
    case 'path':
      return mdCode(b.text);
    case 'table':
      return mdTable(b.table);
    case 'charts':
      return '';
    case 'heatmap': {
      const width = Math.max(...b.rows.map((r) => r.label.length));
      return ['```text', ...b.rows.map((r) => `${r.label.padStart(width)} |${r.loads.map((x) => HEAT_SHADES[heatShade(x)]).join('')}|`), '```'].join('\n');
    }
  }
}

/** The ratio table alone, as markdown: what the harness prints last. */
export function formatRatioTable(ratios: RatioRow[]): string {
  return mdTable(table(RATIO_COLUMNS, ratioRows(ratios)));
}

/** The whole report as markdown: header, then per model its shape and each workload's table, then the ratio table. */
export function renderMarkdown(report: BenchReport): string {
  return (
    documentBlocks(report, false)
      .map(mdBlock)
      .filter((s) => s !== '')
      .join('\n\n') + '\n'
  );
}

// ---------------------------------------------------------------------------------------------
// HTML

function esc(s: string): string {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** JSON that can sit inside a <script> element: no `<` (so no `</script` or `<!--`), no line separators. */
function scriptJson(value: unknown): string {
  return JSON.stringify(value)
    .replace(/</g, '\\u003c')
    .replace(/\u2028/g, '\\u2028')
    .replace(/\u2029/g, '\\u2029');
}

let chartJsSource: string | undefined;

/**
 * Chart.js's UMD build, read from the installed package. Its "exports" map does not expose
 * dist/chart.umd.min.js, so resolve the package's CommonJS entry (dist/chart.cjs) and take its
 * sibling. The source map comment is dropped: nothing beside the HTML file would serve the map.
 */
function chartJs(): string {
  if (chartJsSource === undefined) {
    let source: string;
    try {
      const entry = createRequire(import.meta.url).resolve('chart.js');
      source = readFileSync(join(dirname(entry), 'chart.umd.min.js'), 'utf8');
    } catch (e) {
      throw new Error(`renderHtml inlines Chart.js from the chart.js package (dist/chart.umd.min.js), which could not be read: ${(e as Error).message}`);
    }
    chartJsSource = source.replace(/\n\/\/# sourceMappingURL=\S*\s*$/, '\n').replace(/<\/script/gi, '<\\/script');
  }
  return chartJsSource;
}

const INIT_SCRIPT = `
(function () {
  var configs = JSON.parse(document.getElementById('bench-charts').textContent);
  Chart.defaults.font.family = 'system-ui, sans-serif';
  Chart.defaults.animation = false;
  Chart.defaults.responsive = true;
  Chart.defaults.maintainAspectRatio = false;
  var canvases = document.querySelectorAll('canvas[data-chart]');
  for (var i = 0; i < canvases.length; i++) {
    var config = configs[canvases[i].id];
    if (config) new Chart(canvases[i], config);
  }
})();
`;

const STYLE = `
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2228;background:#fff;margin:0 auto;padding:1.5rem 2rem 3rem;max-width:1400px}
h1{font-size:1.5rem;margin:0 0 .75rem}
h2{font-size:1.25rem;margin:2.5rem 0 .5rem;padding-top:.75rem;border-top:1px solid #dde}
h3{font-size:1rem;margin:1.5rem 0 .4rem}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;margin:0}
dl.facts dt{font-weight:600}
dl.facts dd{margin:0}
p.note{margin:.3rem 0;color:#4a525b;font-size:.9rem}
code{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f3f4f6;padding:.1rem .3rem;border-radius:3px;word-break:break-all}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;font-size:.85rem;margin:.3rem 0 .6rem}
th,td{padding:.25rem .6rem;border-bottom:1px solid #e3e5e8;text-align:left;white-space:nowrap}
th{background:#f6f7f9;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.met{color:#1f7a3a;font-weight:600}
td.missed{color:#b3261e;font-weight:600}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:1rem;margin:1rem 0}
figure{margin:0;border:1px solid #e3e5e8;border-radius:6px;padding:.6rem}
figcaption{font-weight:600;font-size:.9rem;margin-bottom:.3rem}
.chart{position:relative;height:320px}
`;

function htmlTable(t: Table): string {
  const cls = (k: number) => (t.align[k] === 'right' ? ' class="num"' : '');
  const cell = (c: string, k: number) => {
    const marker = c === '✓' ? ' class="met"' : c === '✗' || c.startsWith('✗ (') ? ' class="missed"' : cls(k);
    return `<td${marker}>${esc(c)}</td>`;
  };
  return (
    `<div class="table-wrap"><table>\n<thead><tr>${t.head.map((h, k) => `<th${cls(k)}>${esc(h)}</th>`).join('')}</tr></thead>\n<tbody>\n` +
    t.rows.map((r) => `<tr>${r.map(cell).join('')}</tr>`).join('\n') +
    '\n</tbody></table></div>'
  );
}

function htmlBlock(b: Block): string {
  switch (b.kind) {
    case 'heading':
      return `<h${b.level}${b.id ? ` id="${esc(b.id)}"` : ''}>${esc(b.text)}</h${b.level}>`;
    case 'facts':
      return `<dl class="facts">${b.items.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join('')}</dl>`;
    case 'note':
      return `<p class="note">${esc(b.text)}</p>`;
    case 'path':
      return `<p><code>${esc(b.text)}</code></p>`;
    case 'table':
      return htmlTable(b.table);
    case 'heatmap':
      return heatmapSvg(b.rows);
    case 'charts':
      return (
        '<div class="charts">' +
        b.charts
          .map(
            (c) =>
              `<figure><figcaption>${esc(c.title)}</figcaption><div class="chart"${c.height ? ` style="height:${Math.round(c.height)}px"` : ''}>` +
              `<canvas id="${esc(c.id)}" data-chart="${esc(c.kind)}" data-model="${c.model}" role="img" aria-label="${esc(c.title)}"></canvas></div></figure>`,
          )
          .join('') +
        '</div>'
      );
  }
}

/** The heatmap as an inline SVG: a cell per expert and layer, white (no tokens) to dark red (4× the mean or more). */
function heatmapSvg(rows: HeatmapRow[]): string {
  const experts = Math.max(...rows.map((r) => r.loads.length));
  const cell = Math.max(2, Math.min(12, Math.floor(960 / Math.max(1, experts))));
  const rowHeight = Math.max(6, Math.min(14, cell));
  const labelWidth = 70;
  const width = labelWidth + experts * cell;
  const height = rows.length * rowHeight;
  const colour = (load: number) => {
    if (load === 0) return '#ffffff';
    const t = Math.min(1, Math.log2(1 + load) / Math.log2(5)); // 0 → 1 at four times the mean
    return `hsl(${Math.round(50 - 50 * t)}, 90%, ${Math.round(92 - 57 * t)}%)`;
  };
  const cells = rows
    .map((r, y) => {
      const label = `<text x="${labelWidth - 6}" y="${y * rowHeight + rowHeight - 1}" font-size="${Math.min(11, rowHeight)}" text-anchor="end">${esc(r.label)}</text>`;
      const rects = r.loads
        .map((load, x) => `<rect x="${labelWidth + x * cell}" y="${y * rowHeight}" width="${cell}" height="${rowHeight}" fill="${colour(load)}"><title>${esc(`${r.label}, expert ${x}: ${load.toFixed(2)}× mean`)}</title></rect>`)
        .join('');
      return label + rects;
    })
    .join('');
  return `<figure class="heatmap"><svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img" aria-label="expert load per layer">${cells}</svg></figure>`;
}

const sha256 = (text: string) => `'sha256-${createHash('sha256').update(text, 'utf8').digest('base64')}'`;

/**
 * The whole report as one HTML file: the same tables as the markdown plus per-model charts
 * (throughput, TTFT and TPOT percentiles, ratio to reference, roofline fraction; canvas ids
 * `chart-<kind>-<model index>`). Chart.js, the report (`#bench-report`) and the chart
 * configurations (`#bench-charts`) are inlined; a Content-Security-Policy allows no request at all.
 */
export function renderHtml(report: BenchReport): string {
  const blocks = documentBlocks(report, true);
  const charts: Record<string, ChartConfiguration> = {};
  for (const b of blocks) if (b.kind === 'charts') for (const c of b.charts) charts[c.id] = c.config;
  const lib = chartJs();
  const csp = ["default-src 'none'", `script-src ${sha256(lib)} ${sha256(INIT_SCRIPT)}`, "style-src 'unsafe-inline'", "img-src data:", "base-uri 'none'", "form-action 'none'"].join('; ');
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="${esc(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(`Genesis Runtime benchmark — ${report.date}`)}</title>
<style>${STYLE}</style>
</head>
<body>
${blocks.map(htmlBlock).join('\n')}
<script type="application/json" id="bench-report">${scriptJson(report)}</script>
<script type="application/json" id="bench-charts">${scriptJson(charts)}</script>
<script>${lib}</script>
<script>${INIT_SCRIPT}</script>
</body>
</html>
`;
}
