/**
 * The chat page at / in headless Chromium (Debian's chromium through playwright-core): it lists the
 * models, says when one has random weights, streams a reply, stops one on request, sends the API
 * key, and makes no request outside this server.
 *
 * Needs a Chromium binary: $GENESIS_CHROMIUM, else /usr/bin/chromium (Debian: apt-get install
 * chromium). Without one the suite is skipped with a message, not failed.
 */
import { existsSync } from 'node:fs';
import { chromium, type Browser, type Page } from 'playwright-core';
import { openRecorded } from './fixtures/browser.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadModel, type Model } from '../src/index.js';
import { buildServer, type GenesisServer } from '../src/server/index.js';
import { makeFixtureModel } from './fixtures/models.js';

const executable = [process.env['GENESIS_CHROMIUM'], '/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => p && existsSync(p));
if (!executable) console.warn('server-page.test.ts: no Chromium found (set GENESIS_CHROMIUM or apt-get install chromium): skipped');

// In CI (.ci/run installs Debian's chromium) a missing browser is a failure, not a skip.
describe.skipIf(!executable && process.env['CI'] !== 'true')('chat page in headless Chromium', { timeout: 60_000 }, () => {
  let model: Model;
  let app: GenesisServer;
  let keyed: GenesisServer;
  let browser: Browser;
  let base: string;
  let keyedBase: string;

  beforeAll(async () => {
    model = await loadModel(await makeFixtureModel({ arch: 'llama', type: 'q8_0' }), { contextSize: 2048, maxSequences: 2, threads: 1 });
    app = buildServer({ models: [{ name: 'demo', model, randomWeights: true }, { name: 'plain', model }], processMetrics: false });
    await app.listen({ host: '127.0.0.1', port: 0 });
    base = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`;
    keyed = buildServer({ models: [{ name: 'plain', model }], apiKey: 'page-key', processMetrics: false });
    await keyed.listen({ host: '127.0.0.1', port: 0 });
    keyedBase = `http://127.0.0.1:${(keyed.server.address() as { port: number }).port}`;
    browser = await chromium.launch({ executablePath: executable, args: ['--no-sandbox', '--disable-gpu'] });
  });

  afterAll(async () => {
    await browser?.close();
    await app?.close();
    await keyed?.close();
    await model?.dispose();
  });

  /** A page that records every request it makes and every console error. */
  const open = (url: string) => openRecorded(browser, url);

  it('lists the models, labels random weights, streams a reply, and stays on this server', async () => {
    const { page, requests, errors } = await open(`${base}/`);
    await expect.poll(() => page.locator('#model option').allTextContents()).toEqual(['demo', 'plain']);
    expect(await page.locator('#demo-note').isVisible()).toBe(true);
    expect(await page.locator('#demo-note').textContent()).toMatch(/random weights/);
    await page.selectOption('#model', 'plain');
    expect(await page.locator('#demo-note').isVisible()).toBe(false);
    await page.selectOption('#model', 'demo');

    await page.fill('#max-tokens', '24');
    await page.fill('#temperature', '0');
    await page.fill('#prompt', 'Hello there');
    await page.click('#send');
    await expect.poll(() => page.locator('.msg.assistant .meta').count(), { timeout: 20_000 }).toBe(1);
    expect(await page.locator('.msg.user').textContent()).toBe('Hello there');
    const meta = await page.locator('.msg.assistant .meta').textContent();
    expect(meta).toMatch(/^length · 24 tokens · [\d.]+ tokens\/s/);
    // The reply is the greedy chat output of the model itself.
    const expected = await model.chat([{ role: 'user', content: 'Hello there' }], { temperature: 0, maxTokens: 24 }).result;
    const bubble = await page.locator('.msg.assistant').evaluate((el) => el.firstChild?.textContent ?? '');
    expect(bubble).toBe(expected.text);

    // A second turn sends the history (two user messages, one assistant reply).
    await page.fill('#prompt', 'And again');
    await page.keyboard.press('Enter');
    await expect.poll(() => page.locator('.msg.assistant .meta').count(), { timeout: 20_000 }).toBe(2);

    const origins = new Set(requests.map((u) => new URL(u).origin));
    expect([...origins]).toEqual([base]);
    expect(errors).toEqual([]);
    await page.close();
  });

  it('Stop cancels the generation on the server', async () => {
    const { page, errors } = await open(`${base}/`);
    await expect.poll(() => page.locator('#model option').count()).toBe(2);
    await page.fill('#max-tokens', '2000');
    // Click Stop from inside the page as soon as the first text shows: the tiny model would write
    // 2000 tokens in about a second, faster than a click from the test could follow.
    const stopped = page.evaluate<number>(`new Promise((resolve) => {
      const messages = document.getElementById('messages');
      const observer = new MutationObserver(() => {
        const reply = messages.querySelector('.msg.assistant');
        if (reply && reply.textContent.length > 0) {
          observer.disconnect();
          document.getElementById('stop').click();
          resolve(reply.textContent.length);
        }
      });
      observer.observe(messages, { childList: true, subtree: true, characterData: true });
    })`);
    await page.fill('#prompt', 'Go on and on');
    await page.click('#send');
    expect(await stopped).toBeGreaterThan(0);
    await expect.poll(() => page.locator('.msg.assistant .meta').textContent()).toBe('stopped');
    await expect.poll(() => model.stats().active, { timeout: 2000 }).toBe(0);
    const metrics = await (await fetch(`${base}/metrics`)).text();
    expect(metrics).toMatch(/genesis_generations_total\{model="demo",finish_reason="abort"\} 1\n/);
    expect(errors).toEqual([]);
    await page.close();
  });

  it('asks for the API key when the server needs one, and uses it', async () => {
    const { page } = await open(`${keyedBase}/`);
    await expect.poll(() => page.locator('#status').textContent()).toMatch(/API key/);
    await page.fill('#api-key', 'page-key');
    await page.locator('#api-key').dispatchEvent('change');
    await expect.poll(() => page.locator('#model option').allTextContents()).toEqual(['plain']);
    await page.fill('#max-tokens', '4');
    await page.fill('#prompt', 'Hi');
    await page.click('#send');
    await expect.poll(() => page.locator('.msg.assistant .meta').count(), { timeout: 20_000 }).toBe(1);
    expect(await page.locator('.msg.error').count()).toBe(0);
    await page.close();
  });
});
