// sserelay.js: the browser client for sserelay streams. One dependency-free ES module,
// served by sserelay itself at /static/sserelay.js.
//
//   import { Relay } from '/static/sserelay.js';
//   const relay = new Relay({ getToken: async () => token });  // or new Relay() for cookie sessions
//   const sub = await relay.start({ model: 'sim-fast', prompt: 'Hello' }, {
//     onDelta: (text, index) => { out.textContent += text; },
//     onProgress: (p) => { bar.value = p.percent; },
//     onDone: (d) => console.log('cost', d.cost_usd),
//     onError: (e) => console.warn(e.code, e.message),
//   });
//   const [result] = await sub.done;          // {id, event: 'done' | 'error', data}
//
// What it takes care of:
// - a dropped connection is not the end of a stream: EventSource's own `error` event (no
//   data) means "connection trouble", the server's `error` event (with data) is a
//   terminal event. The browser reconnects by itself with Last-Event-ID; when it gives up
//   (readyState CLOSED: a 401 for an expired ticket, a 5xx, ...) a fresh ticket is asked
//   for and the stream is reopened from the last event applied;
// - every event is applied at most once, even when a resume overlaps;
// - the last event id of each stream is kept in sessionStorage, so a reloaded page
//   resumes where it was (`follow(id)`), or replays all of it (`follow(id, h, {after: 0})`);
// - more than one stream on a page share one connection (`GET /v1/events`): a browser
//   opens at most six HTTP/1.1 connections per host, and a stream whose EventSource waits
//   for one has no reader, so the server cancels it as orphaned.

const TERMINAL = new Set(['done', 'error']);
const EVENTS = ['start', 'delta', 'progress', 'continued', 'done', 'error'];
const KEY_PREFIX = 'sserelay.stream.';
const STATE_RANK = { closed: 0, open: 1, connecting: 2, reconnecting: 3 };

/** Streams one multiplexed connection may carry (the server's cap). */
export const MAX_STREAMS_PER_CONNECTION = 32;

/** An HTTP answer that was not a success: `status`, the problem's stable `code`. */
export class RelayError extends Error {
  constructor(message, { status = 0, code = null, problem = null, retryAfter = null } = {}) {
    super(message);
    this.name = 'RelayError';
    this.status = status;
    this.code = code;
    this.problem = problem;
    this.retryAfter = retryAfter;
  }

  static from(res, problem) {
    const title = problem && problem.title;
    const detail = problem && problem.detail;
    const message = title ? (detail ? `${title}: ${detail}` : title) : `HTTP ${res.status}`;
    const retryAfter = res.headers.get('Retry-After');
    return new RelayError(message, {
      status: res.status,
      code: (problem && problem.code) || null,
      problem,
      retryAfter: retryAfter == null ? null : Number(retryAfter),
    });
  }
}

function defaultStorage() {
  try {
    return globalThis.sessionStorage || null;
  } catch {
    return null; // storage disabled (privacy settings): resume within the page only
  }
}

function report(error) {
  (globalThis.reportError || console.error)(error);
}

// "s_a:12,s_b:7" -> Map {s_a => 12, s_b => 7}
function parseCursor(value) {
  const out = new Map();
  if (!value) return out;
  for (const part of value.split(',')) {
    const at = part.lastIndexOf(':');
    const n = Number.parseInt(part.slice(at + 1), 10);
    if (at > 0 && Number.isFinite(n)) out.set(part.slice(0, at), n);
  }
  return out;
}

const backoff = (n) => Math.min(250 * 2 ** n, 5000); // 250, 500, 1000, ... 5000 ms
const isFatal = (e) => e.status >= 400 && e.status < 500 && e.status !== 408 && e.status !== 429;
const list = (values) => values.map(encodeURIComponent).join(',');

export class Relay {
  /**
   * @param {object} [options]
   * @param {string} [options.baseUrl] where sserelay is ('' = this page's origin).
   * @param {(o: {refresh: boolean}) => Promise<string|null>|string|null} [options.getToken]
   *   the access token for POST/DELETE/ticket requests (sent as Bearer). Called with
   *   `{refresh: true}` after a 401: return a new token, or null. Without a token the
   *   session cookie is used, and after a 401 it is renewed once (POST /v1/auth/refresh).
   * @param {RequestCredentials} [options.credentials] fetch's credentials ('same-origin');
   *   'include' also makes EventSource send cookies cross-origin (withCredentials).
   * @param {Storage|null} [options.storage] where each stream's last event id is kept
   *   (sessionStorage; null: nowhere).
   * @param {boolean} [options.multiplex] several streams on one connection (true).
   * @param {number} [options.maxAttempts] reconnects without progress before giving up (8).
   * @param {number} [options.cancelGraceMs] how long `cancel()` waits for the stream's
   *   own `cancelled` event before ending it locally (3000).
   */
  constructor(options = {}) {
    this.baseUrl = (options.baseUrl || '').replace(/\/+$/, '');
    this.getToken = options.getToken || null;
    this.credentials = options.credentials || 'same-origin';
    this.storage = options.storage === undefined ? defaultStorage() : options.storage;
    this.multiplex = options.multiplex !== false;
    this.maxAttempts = options.maxAttempts ?? 8;
    this.cancelGraceMs = options.cancelGraceMs ?? 3000;
    this.tickets = new Map(); // stream id -> newest ticket
    this._renewing = null; // one session renewal at a time, shared by every request
    this._dirty = new Set();
    this._flushTimer = null;
    if (typeof addEventListener === 'function') addEventListener('pagehide', () => this._flush());
  }

  // ------------------------------------------------------------------ HTTP
  /** A JSON request to sserelay; throws RelayError for anything but 2xx. */
  async request(method, path, body) {
    let token = this.getToken ? await this.getToken({ refresh: false }) : null;
    let res = await this._fetch(method, path, body, token);
    if (res.status === 401) {
      const renewed = await this._renewSession();
      if (renewed) {
        token = renewed.token;
        res = await this._fetch(method, path, body, token);
      }
    }
    const data = res.status === 204 ? null : await res.json().catch(() => null);
    if (!res.ok) throw RelayError.from(res, data);
    return data;
  }

  _fetch(method, path, body, token) {
    const headers = { Accept: 'application/json, application/problem+json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    return fetch(this.baseUrl + path, {
      method,
      headers,
      credentials: this.credentials,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  }

  // After a 401: a new token from getToken, or else a renewed cookie session.
  _renewSession() {
    this._renewing ??= (async () => {
      try {
        const token = this.getToken ? await this.getToken({ refresh: true }) : null;
        if (token) return { token };
        if (this.credentials === 'omit') return null;
        const res = await fetch(`${this.baseUrl}/v1/auth/refresh`, {
          method: 'POST',
          credentials: this.credentials,
          headers: { 'Content-Type': 'application/json' },
          body: '{}',
        });
        // 409: another tab rotated it a moment ago; the cookie jar holds the newer one.
        return res.ok || res.status === 409 ? { token: null } : null;
      } catch {
        return null;
      }
    })().finally(() => {
      setTimeout(() => { this._renewing = null; }, 0); // requests failing together share it
    });
    return this._renewing;
  }

  // ------------------------------------------------------------------ streams
  /** POST /v1/streams: {id, events_url, status_url, ticket, expires_at}. */
  async create(body) {
    const created = await this.request('POST', '/v1/streams', body);
    this.tickets.set(created.id, created.ticket);
    return created;
  }

  /** Create a stream and follow it: resolves to its Subscription once created. */
  async start(body, handlers = {}, options = {}) {
    const created = await this.create(body);
    return this.follow(created.id, handlers, { after: 0, ...options });
  }

  /** A fresh ticket for one's own stream (what reopening after a 401 needs). */
  async ticket(id) {
    const t = await this.request('POST', `/v1/streams/${encodeURIComponent(id)}/ticket`);
    this.tickets.set(id, t.ticket);
    return t;
  }

  /** DELETE /v1/streams/{id}: the stream then ends with an `error` event, code `cancelled`. */
  cancel(id) {
    return this.request('DELETE', `/v1/streams/${encodeURIComponent(id)}`);
  }

  /** GET /v1/streams/{id}: status, text so far, last progress (the polling fallback). */
  status(id) {
    return this.request('GET', `/v1/streams/${encodeURIComponent(id)}`);
  }

  /**
   * Follow one stream (`id`) or several (`[id, ...]`: one connection for up to 32).
   * Handlers (all optional; the stream's id comes last): onStart(data, id),
   * onDelta(text, index, id), onProgress(data, id), onDone(data, id), onError(data, id),
   * onContinued(data, id) (the answer goes on after a provider drop or a worker takeover:
   * {attempt, reason, model, provider}; the deltas simply continue the same text),
   * onConnection(state, subscription) with state 'connecting' | 'open' | 'reconnecting' |
   * 'closed'. onError gets the server's `error` event data ({code, message, retryable}),
   * or, when the client gives up, the same shape with `client: true`. Unknown events
   * are ignored.
   * `options.after`: 'stored' (default: resume from this tab's last applied event, or
   * the start), a number, or {id: number}.
   */
  follow(ids, handlers = {}, options = {}) {
    const many = Array.isArray(ids);
    const all = many ? [...new Set(ids)] : [ids];
    if (!all.length) throw new TypeError('follow: no stream id');
    return new Subscription(this, all, handlers, options.after ?? 'stored', many && all.length > 1);
  }

  /** The last event id applied for `id` in this tab (0: none). */
  lastEventId(id) {
    return this._load(id).last;
  }

  /** Drop what this tab remembers of a stream. */
  forget(id) {
    this._dirty.forEach((s) => { if (s.id === id) this._dirty.delete(s); });
    try { this.storage?.removeItem(KEY_PREFIX + id); } catch { /* storage full or gone */ }
  }

  _load(id) {
    try {
      const saved = JSON.parse(this.storage?.getItem(KEY_PREFIX + id) || 'null');
      if (saved && Number.isInteger(saved.last) && saved.last >= 0) return saved;
    } catch { /* not ours, or storage disabled */ }
    return { last: 0, end: null };
  }

  _remember(stream, now = false) {
    if (!this.storage) return;
    this._dirty.add(stream);
    if (now) return this._flush();
    this._flushTimer ??= setTimeout(() => this._flush(), 200);
  }

  _flush() {
    clearTimeout(this._flushTimer);
    this._flushTimer = null;
    for (const s of this._dirty) {
      try {
        this.storage.setItem(KEY_PREFIX + s.id, JSON.stringify({ last: s.last, end: s.end }));
      } catch { /* quota: resume within the page still works */ }
    }
    this._dirty.clear();
  }
}

/** What `follow` returns: `done` (a promise of every stream's end), `cancel()`,
 * `close()`, `reconnect()`, `state`, `resumes`. */
class Subscription {
  constructor(relay, ids, handlers, after, grouped) {
    this.relay = relay;
    this.handlers = handlers;
    this.ids = ids;
    this.state = 'connecting';
    this.resumes = 0;
    this.closed = false;
    this.done = new Promise((resolve) => { this._resolve = resolve; });
    this.streams = ids.map((id) => {
      const saved = relay._load(id);
      const from = after === 'stored' ? saved.last : typeof after === 'number' ? after : after[id] ?? 0;
      const stored = after === 'stored' && saved.end ? saved.end : null;
      return { id, last: from, ended: false, end: null, stored, cancelTimer: null };
    });
    this.byId = new Map(this.streams.map((s) => [s.id, s]));
    // A stream this tab already saw end is reported from memory, without a request.
    const open = this.streams.filter((s) => !s.stored);
    this.connections = [];
    if (grouped && relay.multiplex) {
      for (let i = 0; i < open.length; i += MAX_STREAMS_PER_CONNECTION) {
        this.connections.push(new Connection(this, open.slice(i, i + MAX_STREAMS_PER_CONNECTION), true));
      }
    } else {
      for (const s of open) this.connections.push(new Connection(this, [s], false));
    }
    queueMicrotask(() => {
      for (const s of this.streams) if (s.stored) this._end(s, s.stored.event, s.stored.data);
      for (const c of this.connections) c.open();
      this._connectionChanged();
    });
  }

  /** The last event id applied for `id` (default: the first stream). */
  lastEventId(id = this.ids[0]) {
    return this.byId.get(id)?.last ?? 0;
  }

  /** Cancel every stream still running (DELETE each). */
  async cancel() {
    const live = this.streams.filter((s) => !s.ended);
    await Promise.all(live.map(async (s) => {
      try {
        await this.relay.cancel(s.id);
      } catch (e) {
        if (e.status !== 404) throw e;
        return this._end(s, 'error', { code: 'stream_not_found', message: e.message, retryable: false, client: true });
      }
      // The stream now ends with error{code: "cancelled"}; if that event cannot reach
      // us (mid-reconnect), do not leave the caller waiting.
      s.cancelTimer = setTimeout(() => {
        if (!s.ended) this._end(s, 'error', { code: 'cancelled', message: 'cancelled', retryable: false, client: true });
      }, this.relay.cancelGraceMs);
    }));
  }

  /** Stop following (the streams go on, and can be followed again). `done` resolves
   * with `event: null` for the streams that had not ended. */
  close() {
    if (this.closed) return;
    this.closed = true;
    for (const c of this.connections) c.close();
    for (const s of this.streams) clearTimeout(s.cancelTimer);
    this.relay._flush();
    this._setState('closed');
    this._resolve(this._results());
  }

  /** Drop the connection and reopen it from the last applied events (after `delayMs`),
   * as after a network change. An expired ticket takes the usual renewal path. */
  reconnect(delayMs = 0) {
    for (const c of this.connections) c.reconnect(delayMs);
    this._connectionChanged();
  }

  _results() {
    return this.streams.map((s) => ({ id: s.id, event: s.end ? s.end.event : null, data: s.end ? s.end.data : null }));
  }

  _call(name, ...args) {
    const handler = this.handlers[name];
    if (typeof handler !== 'function') return;
    try {
      handler(...args);
    } catch (e) {
      report(e); // a failing handler must not break the stream's bookkeeping
    }
  }

  _apply(stream, name, data) {
    if (name === 'start') this._call('onStart', data, stream.id);
    else if (name === 'delta') this._call('onDelta', data.text, data.index, stream.id);
    else if (name === 'progress') this._call('onProgress', data, stream.id);
    else if (name === 'continued') this._call('onContinued', data, stream.id);
    else if (TERMINAL.has(name)) return this._end(stream, name, data);
    this.relay._remember(stream);
  }

  _end(stream, event, data) {
    if (stream.ended) return;
    stream.ended = true;
    stream.end = { event, data };
    clearTimeout(stream.cancelTimer);
    this.relay._remember(stream, true);
    this._call(event === 'done' ? 'onDone' : 'onError', data, stream.id);
    for (const c of this.connections) if (c.streams.includes(stream)) c.streamEnded();
    if (this.streams.every((s) => s.ended) && !this.closed) {
      this.closed = true;
      this._setState('closed');
      this._resolve(this._results());
    }
  }

  _connectionChanged() {
    if (this.closed) return;
    const states = this.connections.filter((c) => !c.closed).map((c) => c.state);
    let state = 'closed';
    for (const s of states) if (STATE_RANK[s] > STATE_RANK[state]) state = s;
    this._setState(state);
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this._call('onConnection', state, this);
  }
}

/** One EventSource: one stream on its own events URL, or several on /v1/events. */
class Connection {
  constructor(sub, streams, grouped) {
    this.sub = sub;
    this.relay = sub.relay;
    this.streams = streams;
    this.grouped = grouped;
    this.es = null;
    this.state = 'connecting';
    this.closed = false;
    this.hadOpen = false;
    this.attempts = 0; // reconnects since the last event applied
    this.timer = null;
  }

  live() {
    return this.streams.filter((s) => !s.ended);
  }

  open() {
    if (this.closed) return;
    if (!this.live().length) return this.close();
    // Streams this page did not create (a reload) need a ticket first.
    if (this.live().some((s) => !this.relay.tickets.has(s.id))) return this.recover();
    this.connect();
  }

  url() {
    const live = this.live();
    const tickets = live.map((s) => this.relay.tickets.get(s.id));
    if (!this.grouped) {
      const s = live[0];
      let path = `/v1/streams/${encodeURIComponent(s.id)}/events?ticket=${encodeURIComponent(tickets[0])}`;
      if (s.last > 0) path += `&last_event_id=${s.last}`;
      return this.relay.baseUrl + path;
    }
    let path = `/v1/events?streams=${list(live.map((s) => s.id))}&tickets=${list(tickets)}`;
    const cursor = live.filter((s) => s.last > 0).map((s) => `${s.id}:${s.last}`);
    if (cursor.length) path += `&last_event_id=${list(cursor)}`;
    return this.relay.baseUrl + path;
  }

  connect() {
    clearTimeout(this.timer);
    this.dropEventSource();
    if (this.closed || !this.live().length) return;
    const es = new EventSource(this.url(), { withCredentials: this.relay.credentials === 'include' });
    this.es = es;
    es.onopen = () => {
      if (es !== this.es || this.closed) return;
      if (this.hadOpen) this.sub.resumes += 1;
      this.hadOpen = true;
      this.setState('open');
    };
    for (const name of EVENTS) {
      es.addEventListener(name, (ev) => {
        // "error" is both the server's terminal event (a MessageEvent with data) and
        // EventSource's own connection-error event (no data): never confuse the two.
        if (name === 'error' && typeof ev.data !== 'string') this.connectionError(es);
        else this.event(es, name, ev);
      });
    }
  }

  event(es, name, ev) {
    if (es !== this.es || this.closed) return;
    let data;
    try { data = JSON.parse(ev.data); } catch { return; } // not ours
    if (!data || typeof data !== 'object') return;
    const stream = this.grouped ? this.sub.byId.get(data.stream_id) : this.streams[0];
    if (!stream || stream.ended || !this.streams.includes(stream)) return;
    // Apply each event once: a resume may overlap what was applied. The id is this
    // stream's own, or its entry in the composite cursor of a multiplexed connection.
    const id = this.grouped ? parseCursor(ev.lastEventId).get(stream.id) : Number.parseInt(ev.lastEventId, 10);
    if (Number.isFinite(id)) {
      // An id-less terminal error (the server could not read the log) shows the id of
      // the event before it: a terminal event at the current id is new.
      if (id < stream.last || (id === stream.last && !TERMINAL.has(name))) return;
      stream.last = id;
    }
    this.attempts = 0; // progress: the reconnect budget starts over
    this.sub._apply(stream, name, data);
  }

  connectionError(es) {
    if (es !== this.es || this.closed) return;
    if (es.readyState === EventSource.CONNECTING) {
      // The connection dropped; the browser reconnects by itself, with Last-Event-ID.
      if (++this.attempts > this.relay.maxAttempts) return this.giveUp();
      return this.setState('reconnecting');
    }
    // CLOSED: the browser will not retry (401 for an expired ticket, 5xx, a proxy's
    // error page). EventSource shows no status: renew the tickets and reopen.
    this.dropEventSource();
    this.scheduleRecovery();
  }

  scheduleRecovery() {
    if (this.attempts >= this.relay.maxAttempts) return this.giveUp();
    this.setState('reconnecting');
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.recover(), backoff(this.attempts++));
  }

  async recover() {
    if (this.closed) return;
    const live = this.live();
    const renewed = await Promise.allSettled(live.map((s) => this.relay.ticket(s.id)));
    if (this.closed) return;
    let retry = false;
    renewed.forEach((r, i) => {
      if (r.status === 'fulfilled') return;
      const e = r.reason;
      if (e && e.status === 404) {
        this.sub._end(live[i], 'error', { code: 'stream_not_found', message: e.message, retryable: false, client: true });
      } else if (e && isFatal(e)) {
        this.sub._end(live[i], 'error', { code: e.code || `http_${e.status}`, message: e.message, retryable: false, client: true });
      } else {
        retry = true; // network failure, 5xx, 429: may pass
      }
    });
    if (this.closed || !this.live().length) return;
    if (retry) return this.scheduleRecovery();
    this.connect();
  }

  reconnect(delayMs) {
    if (this.closed) return;
    this.dropEventSource();
    this.setState('reconnecting');
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delayMs);
  }

  giveUp() {
    const attempts = this.relay.maxAttempts;
    for (const s of this.live()) {
      this.sub._end(s, 'error', {
        code: 'connection_lost', message: `gave up reconnecting after ${attempts} attempts`, retryable: true, client: true,
      });
    }
    this.close();
  }

  streamEnded() {
    if (!this.live().length) this.close(); // before the server's close reads as a drop
  }

  dropEventSource() {
    if (this.es) this.es.close();
    this.es = null;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    this.dropEventSource();
    this.state = 'closed';
    this.sub._connectionChanged();
  }

  setState(state) {
    this.state = state;
    this.sub._connectionChanged();
  }
}
