// sserelay demo page: get a token, list models, run one resumable stream through
// sserelay.js (the client module every page should use) and show its text, progress,
// ETA and cost. Plain ES2020, no dependencies.
import { Relay } from './sserelay.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'sserelay.token';        // a pasted token, for this tab only
const SUBJECT_KEY = 'sserelay.demo.sub';   // this tab's own subject in development mode
const PLAN_KEY = 'sserelay.demo.plan';     // the plan picked in development mode
const SHOWN_KEY = 'sserelay.demo.stream';  // the stream on screen, saved as the page goes
const PLANS = ['free', 'pro'];             // the built-in configuration's plans
const usd = (v) => `$${Number(v).toFixed(6)}`;
const CONN_TEXT = { connected: 'connected', reconnecting: 'reconnecting…', closed: 'closed' };

const S = {
  token: null, devToken: false, // devToken: minted by /v1/auth/dev-token, so we may mint another
  plan: null, plans: [...PLANS], ready: false, status: 'idle', streamId: null, text: '', finished: true,
  sub: null,       // the Subscription following the stream on screen
  restored: false, // the stream on screen was restored after a reload
};

// Tokens for POST/DELETE/ticket requests. Without one, the session cookie is used.
const relay = new Relay({
  getToken: async ({ refresh }) => {
    if (!refresh) return S.token;
    return S.devToken && (await fetchDevToken(S.plan)) ? S.token : null;
  },
});

// ---------------------------------------------------------------- auth, plans
// Each tab is its own subject, so this page and curl experiments (or another tab) do not
// share one rate limit; kept across reloads, which is what lets a reload resume.
function subject() {
  let sub = sessionStorage.getItem(SUBJECT_KEY);
  if (!sub) {
    const bytes = crypto.getRandomValues(new Uint8Array(6));
    sub = `demo-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
    sessionStorage.setItem(SUBJECT_KEY, sub);
  }
  return sub;
}

async function fetchDevToken(plan) {
  try {
    // No Authorization header on purpose: a stale token must not make this fail.
    const mint = (body) => fetch('/v1/auth/dev-token', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
    let res = await mint(plan ? { sub: subject(), plan } : { sub: subject() });
    if (res.status === 422 && plan) res = await mint({ sub: subject() }); // not a plan here
    if (!res.ok) return false; // 404: not in development mode
    const d = await res.json();
    Object.assign(S, { token: d.access_token, plan: d.plan, devToken: true });
    return true;
  } catch {
    return false;
  }
}

// Development mode only: pick the plan the page's tokens carry.
function renderPlanPicker() {
  $('plan-picker').hidden = !S.devToken;
  $('plan-badge').hidden = S.devToken;
  if (!S.devToken) return;
  // The built-in plans, and any other this server gave the page (its default plan).
  if (S.plan && !S.plans.includes(S.plan)) S.plans.push(S.plan);
  $('plan-select').replaceChildren(...S.plans.map((p) => new Option(p, p, false, p === S.plan)));
}

async function changePlan() {
  const plan = $('plan-select').value;
  sessionStorage.setItem(PLAN_KEY, plan);
  if (!(await fetchDevToken(plan))) return showError('Could not get a token for that plan.');
  renderPlanPicker();
  loadModels();
}

// ---------------------------------------------------------------- UI helpers
function setStatus(s) {
  S.status = s;
  $('status').textContent = s;
  $('status').dataset.state = s;
}
function setConn(kind) {
  $('conn').textContent = CONN_TEXT[kind];
  $('conn').dataset.state = kind;
}
function showError(msg) {
  $('error').textContent = msg || '';
  $('error').hidden = !msg;
}

function setButtons() {
  const live = !S.finished;
  $('start').disabled = !S.ready || live;
  $('cancel').disabled = !live || !S.streamId;
  $('blip').disabled = !live || !S.sub;
  $('plan-select').disabled = live;
  $('output').setAttribute('aria-busy', String(live));
}

// 42 -> "42 s", 1500 -> "25 min", 82800 -> "23 h"
function duration(seconds) {
  const s = Math.max(0, Number(seconds));
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 90 * 60) return `${Math.round(s / 60)} min`;
  if (s < 48 * 3600) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

function renderProgress(p) {
  const pct = p.percent == null ? null : Math.max(0, Math.min(100, Number(p.percent)));
  if (pct != null) { $('progress').value = pct; $('percent').textContent = `${Math.round(pct)}%`; }
  if (p.output_tokens != null) $('tokens').textContent = String(p.output_tokens);
  if (p.tokens_per_second != null) $('tps').textContent = Number(p.tokens_per_second).toFixed(1);
  if ('eta_ms' in p) $('eta').textContent = p.eta_ms == null ? '–' : `${(p.eta_ms / 1000).toFixed(1)} s`;
  if (p.cost_usd != null) $('cost').textContent = usd(p.cost_usd);
  if (p.projected_cost_usd != null) $('projected').textContent = usd(p.projected_cost_usd);
}

function renderText() {
  const out = $('output');
  const atBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 24;
  out.textContent = S.text;
  if (atBottom) out.scrollTop = out.scrollHeight; // follow the text unless the user scrolled up
}

function resetOutput() {
  const blank = { output: '', meta: '', percent: '0%', tokens: '0', resumes: '0', cost: usd(0),
    tps: '–', eta: '–', projected: '–', ttft: '–' };
  for (const [id, text] of Object.entries(blank)) $(id).textContent = text;
  $('progress').value = 0;
  $('feedback').hidden = true;
  $('recovered').hidden = true;
  $('feedback-status').textContent = '';
  for (const id of ['thumb-up', 'thumb-down']) $(id).disabled = false;
  showError('');
}

// Thumbs up/down on a finished answer: attached to the stream's request record.
async function sendFeedback(rating, retried = false) {
  for (const id of ['thumb-up', 'thumb-down']) $(id).disabled = true;
  try {
    await relay.request('POST', `/v1/streams/${encodeURIComponent(S.streamId)}/feedback`, { rating });
    $('feedback-status').textContent = 'Thanks!';
  } catch (e) {
    // The record lands a moment after `done`: one quick retry covers a fast click.
    if (e.status === 404 && !retried) {
      await new Promise((resolve) => setTimeout(resolve, 500));
      return sendFeedback(rating, true);
    }
    $('feedback-status').textContent = e.message;
    for (const id of ['thumb-up', 'thumb-down']) $(id).disabled = false;
  }
}

// ---------------------------------------------------------------- models, usage
async function init() {
  const params = new URLSearchParams(location.search);
  const fromUrl = params.get('token');
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    // Drop the token from the address bar so it does not linger in history or get copied.
    params.delete('token');
    const qs = params.toString();
    history.replaceState(null, '', location.pathname + (qs ? `?${qs}` : '') + location.hash);
  }
  S.token = fromUrl || sessionStorage.getItem(TOKEN_KEY);
  if (!S.token) await fetchDevToken(sessionStorage.getItem(PLAN_KEY));
  renderPlanPicker();
  // With no token at all, a same-origin cookie session may still work; if not,
  // loadModels shows the token panel.
  if (await loadModels()) restoreShown();
}

async function loadModels() {
  try {
    const d = await relay.request('GET', '/v1/models');
    const sel = $('model');
    sel.replaceChildren();
    for (const m of d.data || []) {
      const price = `$${m.input_usd_per_mtok} / $${m.output_usd_per_mtok} per Mtok`;
      const opt = new Option(`${m.id} (${m.provider}) · ${price}`, m.id);
      opt.dataset.max = m.max_output_tokens;
      sel.add(opt);
    }
    $('plan').textContent = d.plan || '–';
    $('token-panel').hidden = true;
    showError('');
    S.ready = sel.options.length > 0;
    syncMaxTokens();
    setButtons();
    refreshUsage();
    return true;
  } catch (e) {
    const hadToken = Boolean(S.token);
    if (e.status === 401 || e.status === 403) { // bad or expired token: ask for another one
      sessionStorage.removeItem(TOKEN_KEY);
      S.token = null;
      $('token-panel').hidden = false;
    }
    if (hadToken || e.status !== 401) showError(e.message); // no session yet is not an error
    return false;
  }
}

// Keep the max-tokens input within the selected model's limit.
function syncMaxTokens() {
  const max = $('model').selectedOptions[0]?.dataset.max;
  if (!max) return;
  $('max-tokens').max = max;
  if (Number($('max-tokens').value) > Number(max)) $('max-tokens').value = max;
}

async function refreshUsage() {
  try {
    const u = await relay.request('GET', '/v1/usage');
    const rows = (u.limits || []).map((l) => `${l.name.replace(/_/g, ' ')}: ${l.remaining} of ${l.limit}`
      + ` left${l.reset_s != null ? ` (resets in ${duration(l.reset_s)})` : ''}`);
    const b = u.budget;
    if (b) {
      rows.push(`daily budget: ${usd(b.remaining_usd)} of ${usd(b.daily_usd)} left`
        + `${b.reset_s != null ? ` (resets in ${duration(b.reset_s)})` : ''}`);
    }
    const li = (t) => Object.assign(document.createElement('li'), { textContent: t });
    $('usage-list').replaceChildren(...rows.map(li));
    $('usage').hidden = false;
  } catch {
    $('usage').hidden = true; // no session, or the endpoint is not deployed: no panel
  }
}

// ---------------------------------------------------------------- the stream
const HANDLERS = {
  onStart(d) {
    $('meta').textContent = `${d.model} · ${d.provider} · max ${d.max_tokens} tokens · stream ${d.stream_id}`;
    setStatus('streaming');
  },
  onDelta(text, index) {
    if (!Number.isInteger(index)) index = S.text.length;
    if (index > S.text.length) return replayFromStart(); // a gap: never show a hole
    S.text = S.text.slice(0, index) + text; // `index` places the text: an overlap cannot repeat it
    renderText();
  },
  onProgress: renderProgress,
  onContinued(d) {
    // Informational: the text goes on seamlessly; say discreetly that it recovered.
    const why = d.reason === 'takeover' ? 'another worker took over' : `the provider failed (${d.reason})`;
    $('recovered').textContent = `Recovered: ${why}; continued on ${d.model} (attempt ${d.attempt}).`;
    $('recovered').hidden = false;
  },
  onDone(d) {
    const cost = d.cost_usd;
    renderProgress({ percent: 100, eta_ms: 0, output_tokens: d.usage?.output_tokens,
      cost_usd: cost, projected_cost_usd: cost });
    if (d.ttft_ms != null) $('ttft').textContent = `${Math.round(d.ttft_ms)} ms`;
    finish(d.stop_reason === 'cancelled' ? 'cancelled' : 'done');
  },
  onError(d) {
    if (d.code === 'cancelled') return finish('cancelled');
    if (d.client && d.code === 'stream_not_found' && S.restored) { // expired while away
      sessionStorage.removeItem(SHOWN_KEY);
      resetOutput();
      Object.assign(S, { streamId: null, text: '', sub: null });
      return finish('idle');
    }
    finish('error', `${d.code}: ${d.message}${d.retryable ? ' (retryable)' : ''}`);
  },
  onConnection(state, sub) {
    if (S.finished) return;
    $('resumes').textContent = String(sub.resumes);
    if (state === 'open') { setConn('connected'); setStatus('streaming'); }
    else if (state === 'reconnecting') { setConn('reconnecting'); setStatus('reconnecting'); }
    else if (state === 'connecting') setStatus('connecting');
  },
};

function follow(id, options = {}) {
  S.sub = relay.follow(id, HANDLERS, options);
  setButtons();
}

function replayFromStart() {
  S.sub?.close();
  S.text = '';
  renderText();
  follow(S.streamId, { after: 0 });
}

async function startStream() {
  S.sub?.close();
  if (S.streamId) relay.forget(S.streamId);
  resetOutput();
  Object.assign(S, { streamId: null, sub: null, text: '', finished: false, restored: false });
  setStatus('connecting');
  setButtons();
  try {
    const created = await relay.create(
      { model: $('model').value, prompt: $('prompt').value, max_tokens: Number($('max-tokens').value) });
    S.streamId = created.id;
    follow(created.id, { after: 0 });
    refreshUsage();
  } catch (e) {
    finish('error', e.message);
  }
}

// After a reload: the stream this tab was showing, resumed from its last applied event
// (sserelay.js keeps that id), under the text saved as the page went away.
function restoreShown() {
  let shown = null;
  try { shown = JSON.parse(sessionStorage.getItem(SHOWN_KEY) || 'null'); } catch { /* ignore */ }
  if (!shown || typeof shown.id !== 'string') return;
  Object.assign(S, { streamId: shown.id, text: String(shown.text || ''), finished: false, restored: true });
  $('meta').textContent = String(shown.meta || '');
  renderText();
  setStatus('connecting');
  follow(shown.id);
}

function finish(status, message) {
  S.finished = true;
  setStatus(status);
  setConn('closed');
  if (message) showError(message);
  setButtons();
  refreshUsage();
  // The record is written as the stream ends; a moment later it can take feedback.
  if (status === 'done') $('feedback').hidden = false;
}

async function cancelStream() {
  if (S.finished || !S.sub) return;
  $('cancel').disabled = true;
  try {
    await S.sub.cancel(); // the stream ends with error{code: "cancelled"}
  } catch (e) {
    if (!S.finished) { showError(e.message); setButtons(); }
  }
}

// Demo of resume: drop the connection and reopen it from the last applied event, as a
// real reconnect would (the pause makes the drop visible). An expired ticket then takes
// the normal renewal path.
function simulateDrop() {
  if (!S.finished && S.sub) S.sub.reconnect(400);
}

// ---------------------------------------------------------------- wiring
function saveToken() {
  const t = $('token-input').value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  Object.assign(S, { token: t, devToken: false });
  $('token-input').value = '';
  renderPlanPicker();
  loadModels();
}

// Module scripts run once the DOM is parsed.
$('stream-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  if (S.ready && S.finished) startStream();
});
$('cancel').addEventListener('click', cancelStream);
$('blip').addEventListener('click', simulateDrop);
$('thumb-up').addEventListener('click', () => sendFeedback('up'));
$('thumb-down').addEventListener('click', () => sendFeedback('down'));
$('model').addEventListener('change', syncMaxTokens);
$('plan-select').addEventListener('change', changePlan);
$('token-save').addEventListener('click', saveToken);
$('token-input').addEventListener('keydown', (ev) => { if (ev.key === 'Enter') saveToken(); });
addEventListener('pagehide', () => {
  if (S.streamId) {
    sessionStorage.setItem(SHOWN_KEY, JSON.stringify({ id: S.streamId, text: S.text, meta: $('meta').textContent }));
  }
});
init();

// Read-only hook for the browser tests.
window.sserelayDemo = {
  state: () => ({
    status: S.status, lastEventId: S.sub ? S.sub.lastEventId() : 0, text: S.text,
    resumes: S.sub ? S.sub.resumes : 0, streamId: S.streamId,
  }),
};
