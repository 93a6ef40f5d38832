/**
 * GET /: a small self-contained chat page (inline HTML, CSS and JS; no CDN, no external request).
 * It lists models from /v1/models, streams replies from /v1/chat/completions with fetch and its own
 * SSE parsing, takes an optional API key, and says so when the model has random weights.
 * The Content-Security-Policy allows only this page's own script and style (by hash) and requests to
 * this server.
 */
import { createHash } from 'node:crypto';

const STYLE = `
*{box-sizing:border-box}
code{white-space:nowrap}
body{margin:0;font:15px/1.45 system-ui,sans-serif;background:#f6f7f9;color:#1d2228;display:flex;flex-direction:column;height:100vh}
header{display:flex;flex-wrap:wrap;gap:.6rem;align-items:center;padding:.6rem 1rem;background:#1d2228;color:#fff}
header h1{font-size:1rem;margin:0 1rem 0 0}
header label{font-size:.8rem;display:flex;gap:.3rem;align-items:center}
header input,header select{font:inherit;font-size:.85rem;padding:.2rem .35rem;border-radius:4px;border:1px solid #889}
header input[type=number]{width:5.5em}
#demo-note{display:none;margin:0;padding:.5rem 1rem;background:#fff3cd;border-bottom:1px solid #e0c36a;font-size:.9rem}
#messages{flex:1;overflow-y:auto;padding:1rem;display:flex;flex-direction:column;gap:.6rem}
.msg{max-width:80ch;padding:.5rem .75rem;border-radius:8px;white-space:pre-wrap;word-break:break-word}
.user{align-self:flex-end;background:#d7e8ff}
.assistant{align-self:flex-start;background:#fff;border:1px solid #dde}
.error{align-self:stretch;background:#fde2e1;border:1px solid #e8a29f}
.meta{font-size:.75rem;color:#667;margin-top:.25rem}
form{display:flex;gap:.5rem;padding:.75rem 1rem;background:#fff;border-top:1px solid #dde}
textarea{flex:1;font:inherit;padding:.5rem;border-radius:6px;border:1px solid #bbc;resize:vertical;min-height:2.8rem}
button{font:inherit;padding:.4rem 1rem;border-radius:6px;border:1px solid #1d2228;background:#1d2228;color:#fff;cursor:pointer}
button:disabled{opacity:.4;cursor:default}
#status{font-size:.8rem;color:#bcd}
`;

const SCRIPT = `
const $ = (id) => document.getElementById(id);
const els = { model: $('model'), key: $('api-key'), temp: $('temperature'), max: $('max-tokens'), messages: $('messages'),
  prompt: $('prompt'), send: $('send'), stop: $('stop'), clear: $('clear'), note: $('demo-note'), status: $('status'), form: $('chat') };
let history = [];
let models = [];
let controller = null;
els.key.value = sessionStorage.getItem('genesis-api-key') || '';

function headers() {
  const h = { 'content-type': 'application/json' };
  if (els.key.value.trim()) h.authorization = 'Bearer ' + els.key.value.trim();
  return h;
}
function bubble(cls, text) {
  const div = document.createElement('div');
  div.className = 'msg ' + cls;
  div.textContent = text;
  els.messages.appendChild(div);
  els.messages.scrollTop = els.messages.scrollHeight;
  return div;
}
function meta(parent, text) {
  const m = document.createElement('div');
  m.className = 'meta';
  m.textContent = text;
  parent.appendChild(m);
}
async function errorText(res) {
  try { const j = await res.json(); return j.error && j.error.message ? j.error.message : res.status + ' ' + res.statusText; }
  catch { return res.status + ' ' + res.statusText; }
}
function showNote() {
  const m = models.find((x) => x.id === els.model.value);
  const random = !!(m && m.meta && m.meta.random_weights);
  els.note.style.display = random ? 'block' : 'none';
}
async function loadModels() {
  els.status.textContent = 'loading models...';
  const res = await fetch('/v1/models', { headers: headers() });
  if (!res.ok) { els.status.textContent = await errorText(res); return; }
  models = (await res.json()).data;
  const previous = els.model.value;
  els.model.replaceChildren(...models.map((m) => { const o = document.createElement('option'); o.value = m.id; o.textContent = m.id; return o; }));
  if (models.some((m) => m.id === previous)) els.model.value = previous;
  els.status.textContent = models.length + ' model' + (models.length === 1 ? '' : 's');
  showNote();
}
function busy(on) {
  els.send.disabled = on;
  els.stop.disabled = !on;
}
async function send(text) {
  history.push({ role: 'user', content: text });
  bubble('user', text);
  const out = bubble('assistant', '');
  const body = { model: els.model.value, messages: history, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat(els.temp.value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt(els.max.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  controller = new AbortController();
  busy(true);
  const started = performance.now();
  let first = 0, reply = '', finish = null, usage = null;
  try {
    const res = await fetch('/v1/chat/completions', { method: 'POST', headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!res.ok) throw new Error(await errorText(res));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let done = false;
    while (!done) {
      const step = await reader.read();
      if (step.done) break;
      buffer += decoder.decode(step.value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf('\\n\\n')) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split('\\n')) {
          if (!line.startsWith('data:')) continue;
          const data = line.slice(5).trim();
          if (data === '[DONE]') { done = true; break; }
          const json = JSON.parse(data);
          if (json.error) throw new Error(json.error.message);
          if (json.usage) usage = json.usage;
          for (const choice of json.choices || []) {
            if (choice.delta && choice.delta.content) {
              if (!first) first = performance.now();
              reply += choice.delta.content;
              out.textContent = reply;
              els.messages.scrollTop = els.messages.scrollHeight;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
      }
    }
    history.push({ role: 'assistant', content: reply });
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : 0;
    meta(out, (finish || 'done') + ' · ' + tokens + ' tokens · ' + (tokens / Math.max(seconds, 1e-3)).toFixed(1) + ' tokens/s' +
      (first ? ' · first token ' + Math.round(first - started) + ' ms' : ''));
  } catch (e) {
    if (e.name === 'AbortError') { history.push({ role: 'assistant', content: reply }); meta(out, 'stopped'); }
    else { if (!reply) out.remove(); history.pop(); bubble('error', String(e.message || e)); }
  } finally {
    controller = null;
    busy(false);
  }
}
els.form.addEventListener('submit', (e) => {
  e.preventDefault();
  const text = els.prompt.value.trim();
  if (!text || controller) return;
  els.prompt.value = '';
  send(text);
});
els.prompt.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); els.form.requestSubmit(); }
});
els.stop.addEventListener('click', () => controller && controller.abort());
els.clear.addEventListener('click', () => { history = []; els.messages.replaceChildren(); });
els.model.addEventListener('change', showNote);
els.key.addEventListener('change', () => { sessionStorage.setItem('genesis-api-key', els.key.value.trim()); loadModels(); });
loadModels();
`;

const HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Genesis chat</title>
<style>${STYLE}</style>
</head>
<body>
<header>
  <h1>Genesis chat</h1>
  <label>Model <select id="model" aria-label="model"></select></label>
  <label>Temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
  <label>Max tokens <input id="max-tokens" type="number" min="1" step="1" value="256"></label>
  <label>API key <input id="api-key" type="password" autocomplete="off" placeholder="only if the server needs one"></label>
  <span id="status"></span>
</header>
<p id="demo-note" role="note">This is the built-in demo model with <strong>random weights</strong>: its replies are noise.
Tokens, streaming, batching and speed are real. Start the server with <code>--model path/to/model.gguf</code> for a real model.</p>
<main id="messages" aria-live="polite"></main>
<form id="chat">
  <textarea id="prompt" placeholder="Message (Enter to send, Shift+Enter for a new line)" aria-label="message"></textarea>
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
  <button id="clear" type="button">Clear</button>
</form>
<script>${SCRIPT}</script>
</body>
</html>
`;

const hash = (text: string) => `'sha256-${createHash('sha256').update(text, 'utf8').digest('base64')}'`;

export const CHAT_PAGE = HTML;

export const CHAT_PAGE_CSP = [
  "default-src 'none'",
  `script-src ${hash(SCRIPT)}`,
  `style-src ${hash(STYLE)}`,
  "connect-src 'self'",
  "img-src 'self' data:",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');
