/**
 * The benchmark report renderers on a sample report (test/fixtures/bench-report.json: a dense
 * llama-shaped model without shared-prefix or roofline results, and a qwen3moe-shaped one with
 * everything): the markdown's sections and ratio table, and the HTML file opened from disk in
 * headless Chromium with its charts drawn and nothing fetched.
 *
 * The browser part needs a Chromium binary: $GENESIS_CHROMIUM, else /usr/bin/chromium (Debian:
 * apt-get install chromium). Without one it is skipped with a message, not failed (outside CI).
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { chromium, type Browser, type Page } from 'playwright-core';
import { openRecorded } from './fixtures/browser.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatRatioTable, renderHtml, renderMarkdown } from '../src/bench/report.js';
import type { BenchReport, RatioRow } from '../src/bench/types.js';

const fixture = new URL('./fixtures/bench-report.json', import.meta.url);
const load = (): BenchReport => JSON.parse(readFileSync(fixture, 'utf8')) as BenchReport;

const DENSE = 'Llama-3.1-8B-Instruct-Q4_K_M';
const MOE = 'Qwen3-30B-A3B-Q4_K_M';
const EVIL = '<img src=x onerror=alert(1)>';

/** Substring checks on the HTML that print the missing text, not the 200 kB page. */
function expectIn(text: string, part: string): void {
  expect(text.includes(part), `expected the page to contain ${part}`).toBe(true);
}
function expectNotIn(text: string, part: string): void {
  expect(text.includes(part), `expected the page not to contain ${part}`).toBe(false);
}

/** The markdown between a model's heading and the next model's (or the ratio section). */
function modelSection(md: string, name: string): string {
  const start = md.indexOf(`## Model: ${name}\n`);
  expect(start).toBeGreaterThanOrEqual(0);
  const next = md.indexOf('\n## ', start + 1);
  return md.slice(start, next < 0 ? undefined : next);
}

/** Cells of the markdown table rows whose first cell is `first` (split on unescaped pipes). */
function rowsStartingWith(md: string, first: string): string[][] {
  return md
    .split('\n')
    .filter((l) => l.startsWith('| '))
    .map((l) => l.slice(2, -2).split(/(?<!\\) \| /))
    .filter((cells) => cells[0] === first);
}

describe('markdown report', () => {
  const report = load();
  const md = renderMarkdown(report);

  it('opens with the run: date, machine, device and measured bandwidth, commits, settings', () => {
    expect(md.startsWith('# Genesis Runtime benchmark — 2026-03-14T09:26:53.000Z\n')).toBe(true);
    expect(md).toContain('- **Machine:** bench-h100-01 · Linux 6.8.0-52-generic x64 · AMD EPYC 9454 48-Core Processor (16 cores) · 128.00 GiB memory');
    expect(md).toContain('- **Device:** NVIDIA H100 80GB HBM3 (cuda) · measured bandwidth 3020.0 GB/s');
    expect(md).toContain('- **Commit:** 7317e9c4b1d2e0f5a8c3b6d9e2f1a4c7b0d3e6f9');
    expect(md).toContain('- **llama.cpp commit:** b5a8c0e1f3d2a7b9c4e6f8a0b2d4c6e8f0a1b3c5');
    expect(md).toContain('threads 16 · batch size 2048 · GPU layers 999 · best of 3 interleaved rounds · concurrency 1, 2, 4, 8 · pp 512, 2048 · tg 128');

    const noBandwidth = load();
    delete noBandwidth.device.bandwidthBytesPerSecond;
    noBandwidth.commit = null;
    const plain = renderMarkdown(noBandwidth);
    expect(plain).toContain('- **Device:** NVIDIA H100 80GB HBM3 (cuda)\n');
    expect(plain).toContain('- **Commit:** unknown\n');
  });

  it('gives each model its shape and every section it has, in order', () => {
    const dense = modelSection(md, DENSE);
    const moe = modelSection(md, MOE);
    expect(dense).toContain('`/models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf`');
    expect(dense).toContain('| llama3-8b | llama | Q4_K_M | 32 | 4096 | 32 / 8 / 128 | 14336 | 128256 | 8.03 B | 4.58 GiB |');
    expect(moe).toContain('| qwen3moe-30b-a3b | qwen3moe | Q4_K_M | 48 | 2048 | 32 / 4 / 128 | 128 (8 used, ff 768) | 151936 | 30.53 B | 17.28 GiB |');
    expect(dense).not.toContain('experts');

    const order = ['### Single stream', '### Batched decoding', '### Server latency', '### Shared prefix', '### Mixed workload', '### Roofline'];
    const positions = order.map((h) => moe.indexOf(h));
    expect(positions.every((p) => p > 0)).toBe(true);
    expect([...positions].sort((a, b) => a - b)).toEqual(positions);
    // The dense model has no shared-prefix or roofline results: those sections are left out.
    expect(dense).not.toContain('### Shared prefix');
    expect(dense).not.toContain('### Roofline');
    expect(dense).toContain('### Mixed workload');
    expect(md.indexOf('## Ratios')).toBeGreaterThan(md.indexOf(`## Model: ${MOE}`));
  });

  it('shows the figures of each table with their ratios', () => {
    const dense = modelSection(md, DENSE);
    const moe = modelSection(md, MOE);
    expect(rowsStartingWith(dense, 'tg128')).toEqual([['tg128', '138.4', '147.2', '0.94']]);
    expect(rowsStartingWith(moe, 'pp512')).toEqual([['pp512', '4012.7', '4890.3', '0.82']]);
    // Batched: B=8 against llama-batched-bench, generation and total.
    expect(rowsStartingWith(moe, '8')[0]).toEqual(['8', '512', '128', '640.9', '552.3', '1.16', '2499.5', '2197.0', '1.14']);
    // Server latency: one row per server at each concurrency, with TTFT and TPOT percentiles.
    const b8 = rowsStartingWith(dense, '8').filter((r) => r.length === 14);
    expect(b8).toEqual([
      ['8', '512', '128', 'genesis', '32/32', '870.3', '6.80', '121.6', '159.3', '222.5', '8.5', '11.2', '15.6', '0'],
      ['8', '512', '128', 'llama-server', '31/32', '820.7', '6.41', '130.2', '170.6', '238.3', '9.1', '11.9', '16.6', '1'],
    ]);
    expect(dense).toContain('llama-server at B=8: 1 of 32 requests failed; first error: HTTP 503:');
    expect(moe).toContain('32 requests at concurrency 8: a 1536-token shared prefix, a 64-token suffix each, 64 tokens generated.');
    expect(rowsStartingWith(moe, 'genesis')[0]).toEqual(['genesis', '32/32', '702.4', '10.97', '34.2', '44.8', '62.6', '11.4', '14.9', '20.8', '0']);
    expect(moe).toContain('48 requests, Poisson arrivals at 2.50 req/s, prompts 32–1024 tokens, 16–256 tokens generated, seed 42.');
    // Roofline: experts per layer, weight MB per step, ideal and measured tokens/s, fraction in %.
    expect(rowsStartingWith(moe, '1').at(-1)).toEqual(['1', '8.0', '1717.2', '1758.7', '170.2', '9.7%']);
    expect(rowsStartingWith(moe, '8').at(-1)).toEqual(['8', '51.6', '7274.5', '3321.2', '640.9', '19.3%']);
  });

  it('ends with the ratio table: every row, its ratio, and ✓/✗ only where there is a target', () => {
    const ratios = md.slice(md.indexOf('## Ratios'));
    expect(ratios).toContain(formatRatioTable(report.ratios));
    const lines = formatRatioTable(report.ratios).split('\n');
    expect(lines[0]).toBe('| model | workload | test | metric | genesis | reference (tool) | ratio | target | met? |');
    expect(lines).toHaveLength(2 + report.ratios.length);
    report.ratios.forEach((r, k) => {
      const cells = lines[k + 2]!.slice(2, -2).split(' | ');
      expect(cells[0]).toBe(r.model);
      expect(cells[6]).toBe(r.ratio.toFixed(2));
      if (r.target === undefined) expect(cells.slice(7)).toEqual(['', '']);
      else expect(cells.slice(7)).toEqual([r.target.toFixed(2), r.ratio >= r.target ? '✓' : '✗']);
    });
    expect(lines).toContain('| Qwen3-30B-A3B-Q4_K_M | pp | pp512 | prompt tokens/s | 4012.7 | 4890.3 (llama-bench) | 0.82 | 0.90 | ✗ |');
    expect(lines).toContain('| Qwen3-30B-A3B-Q4_K_M | tg | tg128 | gen tokens/s | 172.6 | 191.3 (llama-bench) | 0.90 | 0.90 | ✓ |');
    expect(lines).toContain('| Llama-3.1-8B-Instruct-Q4_K_M | server | B=8 | TPOT p50 (ms) | 8.5 | 9.1 (llama-server) | 1.07 | 0.90 | ✓ |');
    expect(lines).toContain('| Llama-3.1-8B-Instruct-Q4_K_M | pp | pp2048 | prompt tokens/s | 9630.2 | 10120.9 (llama-bench) | 0.95 |  |  |');
    expect(lines.filter((l) => l.endsWith('| ✗ |'))).toHaveLength(1);
  });

  it('never rounds a miss into a tie, and escapes cells that would break the table', () => {
    const row: RatioRow = {
      model: 'a|b <i>x</i>',
      workload: 'tg',
      label: 'tg128',
      metric: 'gen tokens/s',
      unit: 'tokens/s',
      ours: 89.8,
      reference: 100,
      referenceTool: 'llama-bench',
      ratio: 0.898,
      target: 0.9,
    };
    expect(formatRatioTable([row]).split('\n')[2]).toBe(
      '| a\\|b &lt;i>x&lt;/i> | tg | tg128 | gen tokens/s | 89.8 | 100.0 (llama-bench) | 0.898 | 0.90 | ✗ |',
    );
  });

  it('never counts a target as met when requests failed: a server that drops requests finishes sooner', () => {
    // The H100 run at --batch-size 8192: llama-server failed 135 of 192 requests, and the raw ratio
    // read 2.68.
    const row: RatioRow = {
      model: 'm', workload: 'server', label: 'c=64', metric: 'output throughput', unit: 't/s', ours: 1106.3, reference: 412.7,
      referenceTool: 'llama-server', ratio: 1106.3 / 412.7, target: 1, failed: { ours: 0, reference: 135 },
    };
    expect(formatRatioTable([row]).split('\n')[2]).toBe('| m | server | c=64 | output throughput (t/s) | 1106.3 | 412.7 (llama-server) | 2.68 | 1.00 | ✗ (failed requests: 0 ours, 135 reference) |');
    const noTarget = { ...row, metric: 'TTFT p50 (lower is better)', unit: 'ms', target: undefined };
    expect(formatRatioTable([noTarget]).split('\n')[2]).toMatch(/\| 2\.68 \|  \| \(failed requests: 0 ours, 135 reference\) \|$/);
    const html = renderHtml({ ...report, ratios: [row] });
    expect(html).toContain('<td class="missed">✗ (failed requests: 0 ours, 135 reference)</td>');
  });
});

describe('expert load section', () => {
  // The MoE run with an experts result: 8 experts in 2 layers, one hot expert and one idle.
  const withExperts = (): BenchReport => {
    const report = load();
    report.runs[1]!.experts = {
      concurrency: 8, promptTokens: 64, genTokens: 32, statsOn: 99.5, statsOff: 100,
      layers: [
        { layer: 0, counts: [10, 10, 10, 10, 10, 10, 10, 10] },
        { layer: 1, counts: [45, 0, 5, 4, 6, 10, 5, 5] },
      ],
    };
    return report;
  };

  it('shows the cost of counting and a shaded row per layer in the markdown', () => {
    const section = modelSection(renderMarkdown(withExperts()), MOE);
    expect(rowsStartingWith(section, '8')).toContainEqual(['8', '64', '32', '100.0', '99.5', '0.995']);
    // Layer 0 even (▒: 1× the mean); layer 1: 45/10 = 4.5× (█), none, 0.5× (░), 0.4× (·), 0.6×, 1×, ...
    expect(section).toContain('layer 0 |▒▒▒▒▒▒▒▒|');
    expect(section).toContain('layer 1 |█ ░·░▒░░|');
  });

  it('draws the heatmap as inline SVG with a titled cell per expert and layer', () => {
    const html = renderHtml(withExperts());
    expect(html.match(/<rect /g)?.length).toBe(16);
    expectIn(html, '<title>layer 1, expert 0: 4.50× mean</title>');
    expectIn(html, 'fill="#ffffff"><title>layer 1, expert 1: 0.00× mean</title>');
  });
});

describe('HTML report', () => {
  const report = load();
  const html = renderHtml(report);

  it('inlines Chart.js and the data and points at nothing outside the file', () => {
    expect(/<script>\/\*!\n \* Chart\.js v4\./.test(html)).toBe(true);
    expect(/<script[^>]*\ssrc\s*=/i.test(html)).toBe(false);
    expect(/<link[^>]*\shref\s*=/i.test(html)).toBe(false);
    // Outside the inlined library nothing names a URL at all.
    const withoutLibrary = html.replace(/<script>\/\*!\n \* Chart\.js[\s\S]*?<\/script>/, '');
    expect(/https?:\/\//.test(withoutLibrary)).toBe(false);
    expect(/\s(src|href)\s*=/i.test(withoutLibrary)).toBe(false);
    expectIn(html, 'content="default-src &#39;none&#39;; script-src &#39;sha256-');
    // The embedded report round-trips.
    const json = /<script type="application\/json" id="bench-report">(.*?)<\/script>/s.exec(html)?.[1];
    expect(JSON.parse(json!)).toEqual(report);
  });

  it('shows the same tables as the markdown', () => {
    expectIn(html, '<td>Qwen3-30B-A3B-Q4_K_M</td><td>pp</td><td>pp512</td><td>prompt tokens/s</td><td class="num">4012.7</td>');
    expectIn(html, '<td class="missed">✗</td>');
    expectIn(html, '<h3>Roofline (decode against measured bandwidth)</h3>');
    expectIn(html, '<td class="num">19.3%</td>');
    expect((html.match(/<h3>Shared prefix/g) ?? []).length).toBe(1);
  });

  it('escapes every string from the report', () => {
    const evil = load();
    evil.runs[0]!.name = EVIL;
    evil.runs[0]!.path = `/models/"'&</script><script>alert(2)</script>.gguf`;
    evil.runs[0]!.latency[3]!.reference.firstError = '</script><!-- <script>alert(3)</script>';
    for (const r of evil.ratios) if (r.model === DENSE) r.model = EVIL;
    const out = renderHtml(evil);
    expectNotIn(out, '<img');
    expectNotIn(out, 'alert(2)</script>');
    expectNotIn(out, '<script>alert');
    expectIn(out, 'Model: &#60;img src=x onerror=alert(1)&#62;');
    // In the embedded JSON, `<` is \u003c, so no string can close the script element.
    expectIn(out, '"name":"\\u003cimg src=x onerror=alert(1)>"');
    const md = renderMarkdown(evil);
    expect(md).toContain('## Model: &lt;img src=x onerror=alert(1)>');
    expect(md).not.toContain('<img');
  });
});

const executable = [process.env['GENESIS_CHROMIUM'], '/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => p && existsSync(p));
if (!executable) console.warn('bench-report.test.ts: no Chromium found (set GENESIS_CHROMIUM or apt-get install chromium): browser checks skipped');

// In CI (.ci/run installs Debian's chromium) a missing browser is a failure, not a skip.
describe.skipIf(!executable && process.env['CI'] !== 'true')('HTML report in headless Chromium', { timeout: 60_000 }, () => {
  let browser: Browser;
  let dir: string;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'genesis-bench-report-'));
    browser = await chromium.launch({ executablePath: executable, args: ['--no-sandbox', '--disable-gpu'] });
  });

  afterAll(async () => {
    await browser?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** Opens the rendered report from a file, recording every request and every error. */
  async function open(report: BenchReport, file: string) {
    const path = join(dir, file);
    writeFileSync(path, renderHtml(report));
    const url = pathToFileURL(path).href;
    return { ...(await openRecorded(browser, url)), url };
  }

  /**
   * Whether Chart.js loaded, and the dataset count of the Chart.js instance on each chart canvas
   * by canvas id (null: none). A string, as in server-page.test.ts: the tests compile without DOM types.
   */
  const chartsOnPage = (page: Page) =>
    page.evaluate<{ chartLoaded: boolean; charts: Record<string, number | null> }>(`(() => {
      const charts = {};
      for (const c of document.querySelectorAll('canvas[data-chart]')) {
        const chart = window.Chart && window.Chart.getChart(c);
        charts[c.id] = chart ? chart.data.datasets.length : null;
      }
      return { chartLoaded: typeof window.Chart === 'function', charts };
    })()`);

  it('draws every chart from the file alone, without errors or requests', async () => {
    const { page, url, requests, errors } = await open(load(), 'report.html');
    expect(await chartsOnPage(page)).toEqual({
      chartLoaded: true,
      charts: {
        // Dense model: throughput (batched and server, ours and reference), TTFT and TPOT
        // percentiles (p50/p90/p99 × 2 servers), ratio bars (meets, no target: it misses none) +
        // parity line + targets; no roofline.
        'chart-throughput-0': 4,
        'chart-ttft-0': 6,
        'chart-tpot-0': 6,
        'chart-ratio-0': 4,
        'chart-throughput-1': 4,
        'chart-ttft-1': 6,
        'chart-tpot-1': 6,
        'chart-ratio-1': 5,
        'chart-roofline-1': 1,
      },
    });
    // The charts hold the report's figures: concurrency on x, llama-batched-bench's gen t/s, ratio
    // bars split by verdict, and the roofline fraction in %.
    const detail = await page.evaluate(`(() => {
      const tp = Chart.getChart('chart-throughput-1');
      const ratio = Chart.getChart('chart-ratio-1');
      const rows = (d) => d.data.flatMap((v, i) => (v === null ? [] : [i]));
      return {
        labels: tp.data.labels,
        reference: tp.data.datasets[1].data,
        ratioDatasets: ratio.data.datasets.map((d) => d.label),
        missed: rows(ratio.data.datasets[1]),
        missedColor: ratio.data.datasets[1].backgroundColor,
        parity: ratio.data.datasets[3].data.slice(0, 2),
        roofline: Chart.getChart('chart-roofline-1').data.datasets[0].data,
        drawn: document.getElementById('chart-ratio-1').width > 0,
      };
    })()`);
    expect(detail).toEqual({
      labels: ['1', '2', '4', '8'],
      reference: [188.7, 262.4, 371.6, 552.3],
      // pp512 misses its target (red), pp2048 has none (grey), tg128 meets it (green).
      ratioDatasets: ['meets target', 'misses target', 'no target', 'parity (1.0)', 'target'],
      // pp512 is the one row of this model that misses its target.
      missed: [0],
      missedColor: '#d0443e',
      parity: [1, 1],
      roofline: [9.7, 11.1, 14.5, 19.3],
      drawn: true,
    });
    expect(requests).toEqual([url]);
    expect(errors).toEqual([]);
    await page.close();
  });

  it('keeps a hostile model name as text', async () => {
    const evil = load();
    evil.runs[1]!.name = EVIL;
    for (const r of evil.ratios) if (r.model === MOE) r.model = EVIL;
    const { page, url, requests, errors } = await open(evil, 'evil.html');
    expect(await page.locator('#model-1').textContent()).toBe(`Model: ${EVIL}`);
    expect(await page.locator('img').count()).toBe(0);
    expect((await chartsOnPage(page)).charts['chart-ratio-1']).toBe(5);
    expect(requests).toEqual([url]);
    expect(errors).toEqual([]);
    await page.close();
  });
});
