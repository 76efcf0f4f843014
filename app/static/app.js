// sserelay demo page: get a token, list models, run one resumable SSE stream and
// show its text, progress, ETA and cost. Plain ES2020, no dependencies.
'use strict';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'sserelay.token';
const MAX_ATTEMPTS = 8;
const backoff = (n) => Math.min(250 * 2 ** n, 5000); // 250, 500, 1000, ... 5000 ms
const usd = (v) => `$${Number(v).toFixed(6)}`;
const CONN_TEXT = { connected: 'connected', reconnecting: 'reconnecting…', closed: 'closed' };

const S = {
  token: null, devToken: false, // devToken: minted by /v1/auth/dev-token, so we may mint another
  ready: false, status: 'idle', streamId: null, text: '', resumes: 0, finished: true,
  eventsUrl: null, // newest events_url; its ticket may have expired, recovery gets a new one
  es: null,        // the one live EventSource; events from older ones are ignored
  hadOpen: false,  // a connection of this stream has opened: every later open is a resume
  lastId: null,    // highest SSE id applied (null: none yet)
  attempts: 0,     // reconnect attempts since the last applied event
  timer: null, cancelTimer: null, // pending reconnect/blip, cancel fallback
};

// ---------------------------------------------------------------- HTTP helpers
async function api(method, path, body, retried = false) {
  const headers = { Accept: 'application/json, application/problem+json' };
  if (S.token) headers.Authorization = `Bearer ${S.token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const opts = { method, headers, body: body === undefined ? undefined : JSON.stringify(body) };
  const res = await fetch(path, opts);
  if (res.status === 401 && !retried) {
    // Dev tokens are short-lived: mint a fresh one once rather than break the demo.
    if (S.devToken && (await fetchDevToken())) return api(method, path, body, true);
    // Cookie session (no token in JS at all): the HttpOnly refresh cookie renews it.
    if (!S.token && (await refreshCookieSession())) return api(method, path, body, true);
  }
  const data = await res.json().catch(() => null);
  if (!res.ok) throw problemError(res, data);
  return data;
}

// Same-origin cookie sessions: the browser sends the cookies; we only ask for rotation.
async function refreshCookieSession() {
  try {
    const res = await fetch('/v1/auth/refresh', {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}',
    });
    return res.ok;
  } catch {
    return false;
  }
}

// Turn a problem+json answer into an Error whose message is "title: detail".
function problemError(res, p) {
  const msg = p && p.title ? (p.detail ? `${p.title}: ${p.detail}` : p.title) : `HTTP ${res.status}`;
  const err = Object.assign(new Error(msg), { status: res.status, code: p && p.code });
  const retryAfter = res.headers.get('Retry-After');
  if (res.status === 429 && retryAfter) err.message += ` (retry after ${retryAfter} s)`;
  return err;
}

async function fetchDevToken() {
  try {
    // No Authorization header on purpose: a stale token must not make this fail.
    const headers = { 'Content-Type': 'application/json' };
    const body = JSON.stringify({ sub: 'demo-user' });
    const res = await fetch('/v1/auth/dev-token', { method: 'POST', headers, body });
    if (!res.ok) return false; // 404: not in development mode
    S.token = (await res.json()).access_token;
    return (S.devToken = true);
  } catch { return false; }
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
  $('blip').disabled = !live || !S.eventsUrl;
  $('output').setAttribute('aria-busy', String(live));
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

function resetOutput() {
  const blank = { output: '', meta: '', percent: '0%', tokens: '0', resumes: '0', cost: usd(0),
    tps: '–', eta: '–', projected: '–', ttft: '–' };
  for (const [id, text] of Object.entries(blank)) $(id).textContent = text;
  $('progress').value = 0;
  $('feedback').hidden = true;
  $('feedback-status').textContent = '';
  for (const id of ['thumb-up', 'thumb-down']) $(id).disabled = false;
  showError('');
}

// Thumbs up/down on a finished answer: attached to the stream's request record.
async function sendFeedback(rating, retried = false) {
  for (const id of ['thumb-up', 'thumb-down']) $(id).disabled = true;
  try {
    await api('POST', `/v1/streams/${encodeURIComponent(S.streamId)}/feedback`, { rating });
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

// ---------------------------------------------------------------- auth, models, usage
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
  if (!S.token) await fetchDevToken();
  // With no token at all, a same-origin cookie session may still work; if not,
  // loadModels shows the token panel.
  loadModels();
}

async function loadModels() {
  try {
    const d = await api('GET', '/v1/models');
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
  } catch (e) {
    const hadToken = Boolean(S.token);
    if (e.status === 401 || e.status === 403) { // bad or expired token: ask for another one
      sessionStorage.removeItem(TOKEN_KEY);
      S.token = null;
      $('token-panel').hidden = false;
    }
    if (hadToken || e.status !== 401) showError(e.message); // no session yet is not an error
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
  if (!S.token) return;
  try {
    const u = await api('GET', '/v1/usage');
    const rows = (u.limits || []).map((l) => `${l.name.replace(/_/g, ' ')}: ${l.remaining} of ${l.limit}`
      + ` left${l.reset_s != null ? ` (resets in ${l.reset_s} s)` : ''}`);
    const b = u.budget;
    if (b) rows.push(`daily budget: ${usd(b.remaining_usd)} of ${usd(b.daily_usd)} left`);
    const li = (t) => Object.assign(document.createElement('li'), { textContent: t });
    $('usage-list').replaceChildren(...rows.map(li));
    $('usage').hidden = false;
  } catch (e) {
    if (e.status === 404) $('usage').hidden = true; // endpoint not deployed: no panel
  }
}

// ---------------------------------------------------------------- the stream
async function startStream() {
  [S.timer, S.cancelTimer].forEach(clearTimeout);
  closeEs();
  resetOutput();
  Object.assign(S, { streamId: null, eventsUrl: null, hadOpen: false, lastId: null, text: '',
    resumes: 0, attempts: 0, finished: false });
  setStatus('connecting');
  setButtons();
  try {
    const d = await api('POST', '/v1/streams',
      { model: $('model').value, prompt: $('prompt').value, max_tokens: Number($('max-tokens').value) });
    S.streamId = d.id;
    S.eventsUrl = d.events_url;
    connect(d.events_url);
    setButtons();
    refreshUsage();
  } catch (e) {
    finish('error', e.message);
  }
}

// events_url (which carries the ticket) plus where to resume from.
function resumeUrl() {
  const u = new URL(S.eventsUrl, location.href);
  if (S.lastId !== null) u.searchParams.set('last_event_id', String(S.lastId));
  return u.href;
}

function closeEs() {
  if (S.es) S.es.close();
  S.es = null;
}

function connect(url) {
  clearTimeout(S.timer);
  closeEs();
  const es = new EventSource(url);
  S.es = es;
  es.onopen = () => {
    if (es !== S.es || S.finished) return;
    if (S.hadOpen) $('resumes').textContent = String(++S.resumes);
    S.hadOpen = true;
    setConn('connected');
    setStatus('streaming');
  };
  for (const type of ['start', 'delta', 'progress', 'done']) {
    es.addEventListener(type, (ev) => onEvent(es, type, ev));
  }
  // "error" is both the transport-error event and the server's named `error` event;
  // only the latter is a MessageEvent carrying data.
  es.addEventListener('error', (ev) => {
    if (typeof ev.data === 'string') onEvent(es, 'error', ev);
    else onConnError(es);
  });
}

function onConnError(es) {
  if (es !== S.es || S.finished) return;
  if (es.readyState === EventSource.CONNECTING) {
    // The browser retries by itself (sending Last-Event-ID); show it and bound it.
    if (++S.attempts > MAX_ATTEMPTS) return finish('error', 'Connection lost: gave up reconnecting.');
    setConn('reconnecting');
    return setStatus(S.hadOpen ? 'reconnecting' : 'connecting');
  }
  // CLOSED: the browser will not retry (401 for an expired ticket, 204, bad response).
  // Ask for a fresh ticket and resume from the last applied event.
  closeEs();
  scheduleRecovery();
}

function scheduleRecovery() {
  if (S.attempts >= MAX_ATTEMPTS) return finish('error', `Could not resume after ${MAX_ATTEMPTS} attempts.`);
  setConn('reconnecting');
  setStatus('reconnecting');
  clearTimeout(S.timer);
  S.timer = setTimeout(recover, backoff(S.attempts++));
}

async function recover() {
  if (S.finished) return;
  try {
    const t = await api('POST', `/v1/streams/${encodeURIComponent(S.streamId)}/ticket`);
    if (S.finished) return;
    S.eventsUrl = t.events_url;
    connect(resumeUrl());
  } catch (e) {
    if (S.finished) return;
    if (e.status === 404 || e.status === 410) return finish('error', `Stream is gone: ${e.message}`);
    // Retrying will not fix auth or validation errors; network failures, 5xx and 429 may pass.
    const fatal = e.status >= 400 && e.status < 500 && ![408, 429].includes(e.status);
    if (fatal) return finish('error', e.message);
    scheduleRecovery();
  }
}

function onEvent(es, type, ev) {
  if (es !== S.es || S.finished) return;
  // A resume may replay events we already applied (header and query can disagree,
  // or the server overlaps): apply each id at most once.
  const id = Number.parseInt(ev.lastEventId, 10);
  if (Number.isFinite(id)) {
    if (S.lastId !== null && id <= S.lastId) return;
    S.lastId = id;
  }
  let d;
  try { d = JSON.parse(ev.data); } catch { return; } // not ours: ignore
  S.attempts = 0; // the stream moved forward: the reconnect budget starts over
  HANDLERS[type](d);
}

const HANDLERS = {
  start(d) {
    $('meta').textContent = `${d.model} · ${d.provider} · max ${d.max_tokens} tokens · stream ${d.stream_id}`;
    setStatus('streaming');
  },
  delta(d) {
    S.text += d.text;
    const out = $('output');
    const atBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 24;
    out.textContent = S.text;
    if (atBottom) out.scrollTop = out.scrollHeight; // follow the text unless the user scrolled up
  },
  progress: renderProgress,
  done(d) {
    const cost = d.cost_usd;
    renderProgress({ percent: 100, eta_ms: 0, output_tokens: d.usage?.output_tokens,
      cost_usd: cost, projected_cost_usd: cost });
    if (d.ttft_ms != null) $('ttft').textContent = `${Math.round(d.ttft_ms)} ms`;
    finish(d.stop_reason === 'cancelled' ? 'cancelled' : 'done');
  },
  error(d) {
    if (d.code === 'cancelled') finish('cancelled');
    else finish('error', `${d.code}: ${d.message}${d.retryable ? ' (retryable)' : ''}`);
  },
};

function finish(status, message) {
  S.finished = true;
  [S.timer, S.cancelTimer].forEach(clearTimeout);
  closeEs();
  setStatus(status);
  setConn('closed');
  if (message) showError(message);
  setButtons();
  refreshUsage();
  // The record is written as the stream ends; a moment later it can take feedback.
  if (status === 'done') $('feedback').hidden = false;
}

async function cancelStream() {
  if (S.finished || !S.streamId) return;
  $('cancel').disabled = true;
  try {
    await api('DELETE', `/v1/streams/${encodeURIComponent(S.streamId)}`);
    // The stream should now end with error{code:"cancelled"} (or done); if that event
    // cannot reach us (e.g. mid-reconnect), do not leave the page hanging.
    clearTimeout(S.cancelTimer);
    S.cancelTimer = setTimeout(() => { if (!S.finished) finish('cancelled'); }, 3000);
  } catch (e) {
    if (!S.finished) { showError(e.message); setButtons(); }
  }
}

// Demo of resume: drop the connection and reopen it from the last applied id, as a
// real reconnect would. An expired ticket then takes the normal recovery path.
function simulateDrop() {
  if (S.finished || !S.eventsUrl) return;
  clearTimeout(S.timer);
  closeEs();
  setConn('reconnecting');
  setStatus('reconnecting');
  S.timer = setTimeout(() => connect(resumeUrl()), 400); // pause so the drop is visible
}

// ---------------------------------------------------------------- wiring
function saveToken() {
  const t = $('token-input').value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  Object.assign(S, { token: t, devToken: false });
  $('token-input').value = '';
  loadModels();
}

// The script is loaded with `defer`, so the DOM is already parsed here.
$('stream-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  if (S.ready && S.finished) startStream();
});
$('cancel').addEventListener('click', cancelStream);
$('blip').addEventListener('click', simulateDrop);
$('thumb-up').addEventListener('click', () => sendFeedback('up'));
$('thumb-down').addEventListener('click', () => sendFeedback('down'));
$('model').addEventListener('change', syncMaxTokens);
$('token-save').addEventListener('click', saveToken);
$('token-input').addEventListener('keydown', (ev) => { if (ev.key === 'Enter') saveToken(); });
init();

// Read-only hook for the browser tests.
window.sserelayDemo = {
  state: () => ({
    status: S.status, lastEventId: S.lastId ?? 0, text: S.text, resumes: S.resumes, streamId: S.streamId,
  }),
};
