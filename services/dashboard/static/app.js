/* llvc live dashboard (see docs/dashboard-api.md).
 *
 * Data flow: GET api/state gives everything; the SSE stream api/stream then sends one `update`
 * per interval, in which the series hold only new items and every other value is current.
 *
 * Cost: the page shares a small machine with a real-time audio pipeline, so it does as little
 * per update as it can. What costs is not the script but each frame the browser renders (style,
 * layout, paint, raster, compositing: ~5 ms of CPU on a small VM however little changed), so
 * the page changes what is on screen as seldom as it usefully can:
 *  - On every update, in the update's own task: the e2e p50/p99 (always in step with
 *    window.llvcDashboard.state), service states, connection, banners: values that change
 *    seldom, so most updates cost no frame at all.
 *  - Every CHART_MS, in the task of an update (one frame for all of it): the charts, the
 *    spectrograms, the events, and the numbers that move on every update (breakdown, compute,
 *    levels, losses, uptimes). NUMBERS_EVERY_UPDATE puts those numbers back on every update,
 *    for one frame per update (about 1.6 times the page's CPU). Nothing is drawn while the page is
 *    hidden; it catches up when shown.
 *  - Only values that changed are written (text nodes keep their node, styles are cached), and
 *    no node is created unless the shape of what is shown changes.
 *  - Charts get about one point per pixel column: the e2e and step-time series as the min and
 *    max of each column (spikes stay visible), the stacked breakdown as column means.
 *  - Spectrograms keep one pixel per frame and band in a small canvas that only shifts and
 *    paints its new columns; the visible canvas gets it scaled, labels drawn once per size.
 */
'use strict';
(() => {
  // ---------------------------------------------------------------- constants
  const CHART_MS = 500;             // charts, spectrograms, moving numbers: ~2 times per second
  const NUMBERS_EVERY_UPDATE = false;
  const FRAMES_KEEP_S = 10;         // sound.frames cover the last 10 s (contract)
  const EVENTS_KEEP = 100;
  const PENDING_MAX = 500;          // updates buffered while /api/state is being fetched
  const DASH = '\u2013';
  const PART_COLOURS = ['#4c78a8', '#72b7b2', '#e0c341', '#f58518', '#54a24b', '#b279a2',
    '#e45756', '#9d755d', '#bab0ac'];
  const SERIES = [['latency', 'chunks'], ['latency', 'quantiles'], ['breakdown', 'chunks'],
    ['compute', 'chunks']];
  const FRAMES = [['sound', 'frames', 'input'], ['sound', 'frames', 'output']];
  const SPEC_DB = [-100, -20];      // spectrogram colour-map range
  const SPEC_BG = [0x0b, 0x0d, 0x12];
  const AXIS = { stroke: '#8b949e', font: '10px system-ui, sans-serif',
    grid: { stroke: 'rgba(255,255,255,0.06)', width: 1 },
    ticks: { stroke: 'rgba(255,255,255,0.12)', width: 1, size: 4 } };

  // ---------------------------------------------------------------- helpers
  const $ = (id) => document.getElementById(id);
  const isNum = (v) => typeof v === 'number' && isFinite(v);
  const arr = (v) => (Array.isArray(v) ? v : []);
  const obj = (v) => (v && typeof v === 'object' && !Array.isArray(v) ? v : {});
  const fmt = (v, digits = 1, unit = '') => (isNum(v) ? toFixedEven(v, digits) + unit : DASH);
  const count = (v) => (!isNum(v) ? DASH : Number.isInteger(v) ? String(v) : toFixedEven(v, 1));
  const pct = (db) => Math.max(0, Math.min(100, (db + 60) / 60 * 100));   // -60..0 dBFS -> %
  const getPath = (o, path) => path.reduce((a, k) => (a == null ? undefined : a[k]), o);

  /** v.toFixed(d), except that exact binary ties round half to even, as Python's format()
   *  does: the text then equals f"{v:.1f}" (toFixed turns 22.25 into 22.3, Python into 22.2). */
  function toFixedEven(v, d) {
    const s = v.toFixed(d);
    const exact = Math.abs(v).toFixed(Math.min(100, d + 60));   // the double's exact decimals
    const i = exact.indexOf('.') + d + 1;                       // first digit dropped
    if (exact[i] !== '5' || /[1-9]/.test(exact.slice(i + 1))) return s;     // not a tie
    let kept = exact.slice(0, i);
    if (kept.endsWith('.')) kept = kept.slice(0, -1);
    return Number(kept[kept.length - 1]) % 2 ? s : (v < 0 ? '-' : '') + kept;
  }

  function setPath(o, path, value) {
    let a = o;
    for (const k of path.slice(0, -1)) a = (a[k] = obj(a[k]));
    a[path[path.length - 1]] = value;
  }

  // Every DOM write goes through these: a write that changes nothing is skipped (it would still
  // cost style, layout or paint work). The last value written is kept on the node, so checking
  // costs no DOM read either.
  function setText(el, text) {
    if (!el || el._t === text) return;
    el._t = text;
    // change the data of the one text node there is: no node is removed or inserted
    const n = el.firstChild;
    if (n && n === el.lastChild && n.nodeType === 3 && text !== '') n.data = text;
    else el.textContent = text;
  }
  function setStyle(el, prop, value) {
    const k = '_s_' + prop;
    if (el && el[k] !== value) { el[k] = value; el.style[prop] = value; }
  }
  function setHidden(el, hidden) {
    if (el && el._h !== hidden) { el._h = hidden; el.hidden = hidden; }
  }
  function setClass(el, cls, on) {
    const k = '_c_' + cls;
    if (el && el[k] !== on) { el[k] = on; el.classList.toggle(cls, on); }
  }

  function h(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) setText(e, text);   // textContent only: event texts come from the wire
    return e;
  }

  function niceMax(v) {                   // round an axis maximum up to 1, 2 or 5 x 10^k
    if (!isNum(v) || v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    return [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].map((m) => m * p).find((m) => m >= v);
  }

  function duration(s) {
    if (!isNum(s)) return DASH;
    if (s < 60) return s.toFixed(0) + ' s';
    const m = Math.floor(s / 60);
    if (m < 60) return m + 'm ' + String(Math.floor(s % 60)).padStart(2, '0') + 's';
    return Math.floor(m / 60) + 'h ' + String(m % 60).padStart(2, '0') + 'm';
  }

  function clockTime(t) {                 // hh:mm:ss.mmm, local time
    if (!isNum(t)) return DASH;
    const d = new Date(t * 1000), p = (n, w = 2) => String(n).padStart(w, '0');
    return p(d.getHours()) + ':' + p(d.getMinutes()) + ':' + p(d.getSeconds()) + '.' +
      p(d.getMilliseconds(), 3);
  }

  // ---------------------------------------------------------------- state
  let state = {};
  let loading = false;                    // /api/state in flight: stream updates wait in `pending`
  let pending = [];
  let eventsDirty = true;                 // the events table needs a full rebuild
  let eventsNew = 0;                      // else: this many new events lead state.events
  let stream = null, streamFailed = false;
  const arrivals = [];                    // performance.now() of recent updates, for the rate
  const startedAt = performance.now();
  const dash = window.llvcDashboard = { state, updates: 0 };

  const token = new URLSearchParams(location.search).get('token');
  const apiUrl = (path) => (token ? path + '?token=' + encodeURIComponent(token) : path);

  // "now" of the charts: the server's clock, so a slow or skewed browser clock does not matter
  const nowT = () => (isNum(state.t) ? state.t : Date.now() / 1000);
  const historyS = () => (isNum(state.history_s) && state.history_s > 0 ? state.history_s : 60);

  /** Drop leading items (sorted by t = item[0]) older than keepS before the newest, in place. */
  function trimOld(a, keepS) {
    if (!a.length || !Array.isArray(a[a.length - 1])) return a;
    const cut = a[a.length - 1][0] - keepS;
    if (!isNum(cut)) return a;
    let i = 0;
    while (i < a.length && !(arr(a[i])[0] >= cut)) i++;
    if (i) a.splice(0, i);
    return a;
  }

  function replaceState(s) {
    state = obj(s);
    for (const p of SERIES) setPath(state, p, trimOld(arr(getPath(state, p)), historyS()));
    for (const p of FRAMES) setPath(state, p, trimOld(arr(getPath(state, p)), FRAMES_KEEP_S));
    state.events = arr(state.events).slice(0, EVENTS_KEEP);
    dash.state = state;
    eventsDirty = true;
    specReset();
    refresh(true);
  }

  /** Fold one stream update in: series append (to the arrays held, in place), events prepend,
   *  everything else replaces. */
  function mergeUpdate(u) {
    for (const k in state) if (!(k in u)) u[k] = state[k];   // left out: keep
    const keep = isNum(u.history_s) && u.history_s > 0 ? u.history_s : historyS();
    const append = (p, keepS) => {
      const add = getPath(u, p), old = arr(getPath(state, p));
      if (Array.isArray(add)) for (let i = 0; i < add.length; i++) old.push(add[i]);
      setPath(u, p, trimOld(old, keepS));
    };
    for (const p of SERIES) append(p, keep);
    for (const p of FRAMES) append(p, FRAMES_KEEP_S);
    const fresh = arr(u.events), old = arr(state.events);
    if (!fresh.length) u.events = old;
    else {
      // newest first; sorted (stable) so either order of the new batch comes out right
      u.events = fresh.concat(old).sort((a, b) => (obj(b).t || 0) - (obj(a).t || 0)).slice(0, EVENTS_KEEP);
      // the table can take the batch on top as long as it comes out on top
      const newest = old.length ? obj(old[0]).t || 0 : -Infinity;
      if (fresh.every((e) => (obj(e).t || 0) >= newest)) eventsNew += fresh.length;
      else eventsDirty = true;
    }
    state = u;
    dash.state = state;
    dash.updates += 1;
    refresh(false);
  }

  /** Apply an update if it is the next one; skip ones already folded in; resync on a gap. */
  function applyOrResync(u) {
    if (loading) {
      pending.push(u);
      if (pending.length > PENDING_MAX) pending.shift();
      return;
    }
    const last = state.n;
    if (!isNum(u.n) || !isNum(last) || u.n === last + 1) mergeUpdate(u);
    else if (u.n > last + 1) resync();           // the server dropped some: start over
    // u.n <= last: already in the snapshot we fetched
  }

  function resync() {
    if (!loading) { loading = true; fetchState(); }
  }

  let retryMs = 500;                      // /api/state retry back-off (it may answer 503: busy)
  async function fetchState() {
    try {
      const r = await fetch(apiUrl('api/state'), { cache: 'no-store' });
      if (!r.ok) throw new Error('HTTP ' + r.status);
      replaceState(await r.json());
    } catch (e) {
      console.warn('dashboard: /api/state failed, retrying:', e.message);
      setConn('disconnected');
      setTimeout(fetchState, retryMs);
      retryMs = Math.min(5000, retryMs * 2);
      return;
    }
    retryMs = 500;
    loading = false;
    if (stream && stream.readyState === EventSource.OPEN) setConn('live');
    const queued = pending;
    pending = [];
    queued.forEach(applyOrResync);                 // a gap among them resyncs again
  }

  // ---------------------------------------------------------------- stream
  function openStream() {
    stream = new EventSource(apiUrl('api/stream'));
    stream.addEventListener('update', onUpdateEvent);
    stream.onopen = () => {
      setConn('live');
      if (streamFailed) { streamFailed = false; resync(); }   // we missed updates meanwhile
    };
    stream.onerror = () => {
      setConn('disconnected');
      streamFailed = true;
      // EventSource retries by itself after network errors, but gives up for good on an HTTP
      // error or a wrong content type (a restarting server, say): then start a new one.
      if (stream.readyState === EventSource.CLOSED) {
        stream.close();
        setTimeout(openStream, 3000);
      }
    };
  }

  function onUpdateEvent(ev) {
    let u;
    try { u = JSON.parse(ev.data); } catch (e) { console.warn('dashboard: bad update ignored'); return; }
    if (!u || typeof u !== 'object') return;
    arrivals.push(performance.now());
    applyOrResync(u);
  }

  function setConn(c) {
    const el = $('conn');
    if (el.dataset.conn !== c) el.dataset.conn = c;
    setText($('conn-text'), c);
  }

  function renderRate() {                 // on a timer too, so it falls to 0 when updates stop
    const now = performance.now();
    while (arrivals.length && arrivals[0] < now - 5000) arrivals.shift();
    const span = Math.min(5000, now - startedAt) / 1000;   // shorter at first: no false dip
    setText($('rate'), (span > 0.5 ? arrivals.length / span : 0).toFixed(1) + ' upd/s');
  }

  // ---------------------------------------------------------------- render: text
  /** After every update: what must be current on every update. */
  function refresh(force) {
    renderHealth(NUMBERS_EVERY_UPDATE);
    renderControls(obj(state.control), false);
    renderLatencyText();
    if (NUMBERS_EVERY_UPDATE) renderNumbers();
    chartsDue(force);
  }

  /** The numbers that move on every update: with the charts (or on every update, see above). */
  function renderNumbers() {
    renderServices(arr(obj(state.health).services), true);
    renderBreakdownTable();
    renderLosses();
    renderCompute();
    renderLevels();
  }

  function renderHealth(numbers) {
    const hl = obj(state.health);
    setHidden($('overloaded'), !hl.overloaded);
    setText($('stream-id'), hl.stream_id ? 'stream ' + String(hl.stream_id).slice(0, 12) : '');
    renderServices(arr(hl.services), numbers);
    renderModel(hl.model ? obj(hl.model) : null);
  }

  /** The cards, their states, hosts and pids, restarts; with `numbers` uptimes and heartbeat ages. */
  function renderServices(list, numbers) {
    const box = $('services');
    const seen = new Set();
    list.forEach((svc, i) => {
      const s = obj(svc), name = String(s.name ?? '?');
      seen.add(name);
      let card = $('svc-' + name);
      if (!card) card = box.appendChild(serviceCard(name));
      if (box.children[i] !== card) box.insertBefore(card, box.children[i] || null);
      const st = String(s.state ?? 'unseen');
      if (card.dataset.state !== st) card.dataset.state = st;   // only real changes mutate it
      const f = card._f;
      setText(f.badge, st);
      setText(f.where, (s.host ?? DASH) + (s.pid != null ? ' · pid ' + s.pid : ''));
      setText(f.restarts, '↻ ' + count(s.restarts));
      setClass(f.restarts, 'warn', s.restarts > 0);
      if (numbers || f.up._t === undefined) {
        setText(f.up, 'up ' + duration(s.uptime_s));
        setText(f.hb, 'hb ' + fmt(s.heartbeat_age_s, 1, ' s'));
      }
    });
    if (box.children.length !== seen.size) {
      for (const card of [...box.children]) if (!seen.has(card.dataset.name)) card.remove();
    }
  }

  function serviceCard(name) {
    const card = h('div', 'svc');
    card.id = 'svc-' + name;
    card.dataset.name = name;
    const f = card._f = { badge: h('span', 'badge'), where: h('div', 'svc-where dim'),
      up: h('span', 'svc-up'), restarts: h('span', 'svc-restarts'), hb: h('span', 'svc-hb') };
    const head = card.appendChild(h('div', 'svc-head'));
    head.append(h('span', 'svc-name', name), f.badge);
    card.appendChild(f.where);
    card.appendChild(h('div', 'svc-stats')).append(f.up, f.restarts, f.hb);
    card.title = 'up: uptime · ↻: restarts · hb: heartbeat age';
    return card;
  }

  function renderModel(m) {
    setHidden($('model-untrained'), !(m && m.untrained));
    if (!m) {
      setText($('model-name'), 'waiting for inference…');
      setText($('model-meta'), '');
      return;
    }
    const floor = isNum(obj(state.latency).floor_ms) ? state.latency.floor_ms : m.latency_ms;
    setText($('model-name'), String(m.model ?? DASH));
    setText($('model-meta'), [m.kind, m.backend, m.device].map((v) => v ?? DASH).join(' · ') +
      ' · chunk ×' + (m.chunk_factor ?? DASH) + ' = ' + fmt(m.chunk_ms, 1, ' ms') +
      ' · floor ' + fmt(floor, 1, ' ms'));
  }

  function renderLatencyText() {
    const l = obj(state.latency);
    setText($('e2e-p50'), fmt(l.p50_ms, 1, ' ms'));
    setText($('e2e-p99'), fmt(l.p99_ms, 1, ' ms'));
    setText($('e2e-floor'), fmt(l.floor_ms, 1, ' ms'));
    setText($('lat-window'), 'last ' + historyS().toFixed(0) + ' s' +
      (isNum(l.window_s) ? ' · p50/p99 over ' + l.window_s.toFixed(0) + ' s' : ''));
  }

  /** The parts table doubles as the stacked chart's legend (same colours, same order). */
  function renderBreakdownTable() {
    const b = obj(state.breakdown), parts = arr(b.parts), recent = obj(b.recent_ms);
    const body = $('parts-body');
    const sig = partsSig(parts);
    if (body._sig !== sig) {
      body._sig = sig;
      body.replaceChildren(...parts.map((p, i) => {
        const tr = h('tr');
        const sw = h('span', 'swatch');
        sw.style.background = PART_COLOURS[i % PART_COLOURS.length];
        tr.append(h('td'), h('td', null, String(obj(p).label ?? obj(p).key)), h('td', 'r num'));
        tr.firstChild.appendChild(sw);
        return tr;
      }));
    }
    let sum = 0, any = false;
    const rows = body.children;
    for (let i = 0; i < parts.length; i++) {
      const v = recent[obj(parts[i]).key];
      if (isNum(v)) { sum += v; any = true; }
      setText(rows[i].lastChild, fmt(v, 2));
    }
    setText($('parts-sum'), any ? sum.toFixed(2) : DASH);
    setHidden($('clock-note'), b.clock !== 'split');
  }

  const partsSig = (parts) => {
    let s = '';
    for (const p of parts) s += obj(p).key + '\u0001' + (obj(p).label ?? '') + '|';
    return s;
  };

  /** Losses: render whatever keys appear; a {total, per_min} is a counter, objects are groups.
   *  Within a group the zero counters share one line, so a dozen quiet causes stay compact.
   *  The rows are built once per shape (which keys, which of them zero); after that only the
   *  numbers in them are rewritten. */
  const isCounter = (v) => v && typeof v === 'object' && ('total' in v || 'per_min' in v);
  const lossLabel = (k) => k.replace(/_/g, ' ');

  function lossRows(losses) {           // [[kind, name, value]] with kind row | group | zeros | none
    const rows = [];
    for (const key in losses) {
      const v = losses[key];
      if (isCounter(v) || !v || typeof v !== 'object') { rows.push(['', lossLabel(key), v]); continue; }
      rows.push(['group', lossLabel(key), null]);
      const zeros = [];
      for (const k in v) {
        const x = v[k];
        if ((isCounter(x) ? x.total : x) === 0) zeros.push(lossLabel(k));
        else rows.push(['sub', lossLabel(k), x]);
      }
      if (zeros.length) rows.push(['sub zeros', zeros.join(' · '), 0]);
      else if (!Object.keys(v).length) rows.push(['sub zeros', 'none seen', null]);
    }
    return rows;
  }

  function renderLosses() {
    const body = $('losses-body'), rows = lossRows(obj(state.losses));
    let sig = '';
    for (const r of rows) sig += r[0] + '\u0001' + r[1] + '\u0002';
    if (body._sig !== sig) {
      body._sig = sig;
      body.replaceChildren(...(rows.length ? rows.map(([cls, name]) => {
        const tr = h('tr', cls === 'group' ? 'group' : cls);
        if (cls === 'group') { tr.appendChild(h('td', null, name)).colSpan = 3; return tr; }
        tr.append(h('td', null, name), h('td', 'r num'), h('td', 'r num dim'));
        return tr;
      }) : [(() => { const tr = h('tr'); tr.appendChild(h('td', 'dim', 'nothing yet')); return tr; })()]));
    }
    for (let i = 0; i < rows.length; i++) {
      const [cls, , v] = rows[i];
      if (cls === 'group') continue;
      const tr = body.children[i], c = isCounter(v) ? v : { total: v, per_min: null };
      const tot = tr.children[1];
      setText(tot, count(c.total));
      setClass(tot, 'warn', c.total > 0);
      setText(tr.children[2], isNum(c.per_min) ? toFixedEven(c.per_min, 1) : '');
    }
  }

  function renderCompute() {
    const c = obj(state.compute), inf = obj(c.inference_ms), q = obj(c.queue);
    setText($('inf-p50'), fmt(inf.p50, 2, ' ms'));
    setText($('inf-p95'), fmt(inf.p95, 2, ' ms'));
    setText($('inf-mean'), fmt(inf.mean, 2, ' ms'));
    setText($('inf-rtf'), fmt(c.rtf, 1, '×'));
    setClass($('inf-rtf'), 'bad', isNum(c.rtf) && c.rtf < 1);
    setText($('inf-queue'), fmt(q.inference_chunks, 1, ' ch'));
    // jitter buffer: fill against target, on a scale of twice the target
    const fill = q.playback_fill_ms, target = q.playback_target_ms;
    const full = Math.max(isNum(target) ? 2 * target : 0, isNum(fill) ? fill : 0, 1);
    setStyle($('jb-fill'), 'width', (isNum(fill) ? fill / full * 100 : 0).toFixed(1) + '%');
    setStyle($('jb-target'), 'left', (isNum(target) ? target / full * 100 : 0).toFixed(1) + '%');
    setHidden($('jb-target'), !isNum(target));
    setText($('jb-text'), fmt(fill, 1) + ' / ' + fmt(target, 1, ' ms'));
    const edges = arr(obj(c.histogram).edges_ms);
    setText($('hist-note'), edges.length > 1 ? '(last bin ≥ ' + edges[edges.length - 2] + ' ms)' : '');
    renderSessions(c);
  }

  function renderSessions(c) {          // one row per client session; batch sizes in the note
    const body = $('sessions-body'), rows = arr(c.sessions).filter(s => s && typeof s.name === 'string');
    const sig = rows.map(s => s.name).join('\u0001');
    if (body._sig !== sig) {
      body._sig = sig;
      body.replaceChildren(...(rows.length ? rows.map(s => {
        const tr = h('tr');
        tr.append(h('td', null, s.name || '(unnamed)'), h('td', 'r num'), h('td', 'r num'), h('td', 'r num'),
                  h('td', 'r num'), h('td', 'r num'));
        return tr;
      }) : [(() => { const tr = h('tr'); tr.appendChild(h('td', 'dim', 'none yet')); return tr; })()]));
    }
    rows.forEach((s, i) => {
      const td = body.children[i].children;
      setText(td[1], count(s.chunks));
      setText(td[2], fmt(s.e2e_p50_ms, 1, ' ms'));
      setText(td[3], fmt(s.e2e_p99_ms, 1, ' ms'));
      setText(td[4], isNum(s.underruns) ? count(s.underruns) : '–');
      setClass(td[4], 'warn', s.underruns > 0);
      setText(td[5], count(s.dropped));
      setClass(td[5], 'warn', s.dropped > 0);
    });
    const sizes = obj(c.batch_sizes), keys = Object.keys(sizes).sort((a, b) => a - b);
    const steps = keys.reduce((n, k) => n + (isNum(sizes[k]) ? sizes[k] : 0), 0);
    const mean = steps ? keys.reduce((n, k) => n + Number(k) * (isNum(sizes[k]) ? sizes[k] : 0), 0) / steps : null;
    setText($('sessions-note'), (isNum(c.max_streams) ? rows.length + ' of ' + c.max_streams : '') +
            (mean !== null ? ' · ' + toFixedEven(mean, 2) + ' per step' : ''));
  }

  const meters = {};
  function renderLevels() {
    const snd = obj(state.sound);
    for (const side of ['input', 'output']) {
      let m = meters[side];
      if (!m) {
        const row = $('meter-' + side);
        m = meters[side] = { row, mask: row.querySelector('.meter-mask'), tick: row.querySelector('.meter-peak'),
          rms: $('level-' + side + '-rms'), peak: $('level-' + side + '-peak') };
      }
      const lv = obj(snd[side]);
      const rms = lv.rms_dbfs, pk = lv.peak_dbfs;
      setText(m.rms, fmt(rms, 1, ' dBFS'));
      setText(m.peak, isNum(pk) ? 'pk ' + pk.toFixed(1) : '');
      setStyle(m.mask, 'width', (100 - (isNum(rms) ? pct(rms) : 0)).toFixed(1) + '%');
      setHidden(m.tick, !isNum(pk));
      if (isNum(pk)) setStyle(m.tick, 'left', 'calc(' + pct(pk).toFixed(1) + '% - 1px)');
      // a level older than 2 s means that side is not sending: grey it out rather than freeze it
      setClass(m.row, 'idle', !isNum(lv.t) || nowT() - lv.t > 2);
    }
  }

  function eventRow(e) {
    const ev = obj(e), name = String(ev.event ?? '');
    const tr = h('tr', /underrun|drop|stale|error|fail|reset|overload|reject/i.test(name) ? 'warn' : '');
    tr.append(h('td', 'num dim', clockTime(ev.t)), h('td', 'svcname', String(ev.service ?? '')),
      h('td', 'evname', name), h('td', 'text', String(ev.text ?? '')));
    return tr;
  }

  /** New events go on top of the rows there are, the oldest fall off the bottom; the whole
   *  table is rebuilt only after a resync or an event that sorts below the newest shown. */
  function renderEvents() {
    const evs = arr(state.events), body = $('events-body');
    setText($('events-count'), evs.length ? evs.length + ' · newest first' : '');
    if (!evs.length) {
      const tr = h('tr');
      tr.appendChild(h('td', 'dim', 'no events yet')).colSpan = 4;
      body.replaceChildren(tr);
      body._rows = 0;
    } else if (eventsDirty || !body._rows || eventsNew >= evs.length) {
      body.replaceChildren(...evs.map(eventRow));
      body._rows = evs.length;
    } else if (eventsNew) {
      const frag = document.createDocumentFragment();
      for (let i = 0; i < eventsNew; i++) frag.appendChild(eventRow(evs[i]));
      body.insertBefore(frag, body.firstChild);
      while (body.children.length > evs.length) body.lastChild.remove();
      body._rows = body.children.length;
    }
    eventsDirty = false;
    eventsNew = 0;
  }

  // ---------------------------------------------------------------- charts
  const charts = {};            // name -> uPlot
  let chartTimer = 0, lastChartAt = -1e9, chartsStale = true, xWin = [0, 60];

  /** Called after every update: draw now if CHART_MS has passed (in this task, so the charts and
   *  the text go out in one frame), else make sure the last update is drawn even if the stream
   *  stops (a trailing timer, which the next update's draw normally makes moot). */
  function chartsDue(force) {
    chartsStale = true;
    if (document.hidden) return;                 // drawn on visibilitychange
    const since = performance.now() - lastChartAt;
    if (force || since >= CHART_MS * 0.9) { drawCharts(); return; }
    if (!chartTimer) chartTimer = setTimeout(drawCharts, CHART_MS + 150 - since);
  }

  function drawCharts() {
    if (chartTimer) { clearTimeout(chartTimer); chartTimer = 0; }
    if (document.hidden || !charts.latency) return;
    chartsStale = false;
    lastChartAt = performance.now();
    xWin = [nowT() - historyS(), nowT()];
    if (!NUMBERS_EVERY_UPDATE) renderNumbers();
    ensureBreakdownChart();
    charts.latency.setData(latencyData());
    if (charts.breakdown) charts.breakdown.setData(breakdownData());
    const hd = histData();
    if (hd) charts.hist.setData(hd);
    charts.proc.setData(procData());
    drawSpectrogram('input');
    drawSpectrogram('output');
    if (eventsDirty || eventsNew) renderEvents();
  }

  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && chartsStale) drawCharts();
  });

  const holderSize = (el) => ({ width: Math.max(50, el.clientWidth), height: Math.max(40, el.clientHeight) });

  // Charts follow their holder's size; holders have a CSS size of their own (the chart sits
  // absolutely inside), so resizing a chart never feeds back into the observer.
  let resizeFrame = 0;
  const resizer = new ResizeObserver((entries) => {
    for (const e of entries) {
      const t = e.target;
      if (t._chart) {
        const sz = holderSize(t);
        if (sz.width !== t._chart.width || sz.height !== t._chart.height) t._chart.setSize(sz);
      } else if (t.tagName === 'CANVAS') sizeCanvas(t);
    }
    histSig = '';
    if (!resizeFrame) resizeFrame = requestAnimationFrame(() => { resizeFrame = 0; drawCharts(); });
  });

  function makeChart(holderId, opts, data) {
    const holder = $(holderId);
    const u = new uPlot(Object.assign({ legend: { show: false },
      cursor: { show: false, drag: { x: false, y: false }, points: { show: false } } }, holderSize(holder), opts),
    data, holder);
    holder._chart = u;
    resizer.observe(holder);
    return u;
  }

  /** Relative-time x axis over xWin: ticks at now, now-step, ..., labelled "-30 s". */
  function timeAxis() {
    return Object.assign({}, AXIS, { size: 20,
      splits: (u, i, min, max) => {
        const span = max - min, step = span <= 12 ? 2 : span <= 30 ? 5 : span <= 90 ? 10 : 30;
        const out = [];
        for (let v = max; v >= min - 1e-6; v -= step) out.unshift(v);
        return out;
      },
      values: (u, splits) => splits.map((v) => {
        const d = Math.round(v - xWin[1]);
        return d === 0 ? 'now' : d + ' s';
      }) });
  }

  const short = (v) => (Math.abs(v) >= 1000 ? +(v / 1000).toFixed(1) + 'k' : String(+v.toFixed(2)));
  const valueAxis = (size = 34) => Object.assign({}, AXIS, { size,
    values: (u, splits) => splits.map((v) => (isNum(v) ? short(v) : '')) });
  const zeroTo = (minTop) => (u, min, max) => [0, niceMax(Math.max(isNum(max) ? max : 0, minTop) * 1.08)];
  const timeScale = { time: false, range: () => xWin };

  function createCharts() {
    charts.latency = makeChart('chart-latency', {
      // the only chart with a cursor: its readout shows the values under it
      cursor: { drag: { x: false, y: false }, points: { show: false } },
      scales: { x: timeScale, y: { range: (u, mn, mx) =>
        [0, niceMax(Math.max(isNum(mx) ? mx : 0, obj(state.latency).floor_ms || 0, 5) * 1.1)] } },
      axes: [timeAxis(), valueAxis()],
      series: [{}, { stroke: 'rgba(110,143,214,0.75)', width: 1, spanGaps: true },
        { stroke: '#3fb950', width: 2, spanGaps: true },
        { stroke: '#f0883e', width: 2, spanGaps: true },
        { stroke: '#8b949e', width: 1.25, dash: [6, 4], spanGaps: true }],
      hooks: { setCursor: [latencyReadout] },
    }, [[], [], [], [], []]);

    charts.hist = makeChart('chart-hist', {
      scales: { x: { time: false, range: () => histRange }, y: { range: zeroTo(1) } },
      axes: [Object.assign({}, AXIS, { size: 18 }), valueAxis(34)],
      series: [{}, { stroke: '#6e8fd6', fill: 'rgba(110,143,214,0.55)', width: 1,
        paths: uPlot.paths.bars({ size: [0.92, Infinity] }), points: { show: false } }],
    }, [[], []]);

    charts.proc = makeChart('chart-proc', {
      scales: { x: timeScale, y: { range: zeroTo(1) } },
      axes: [timeAxis(), valueAxis(34)],
      series: [{}, { stroke: '#f58518', width: 1, spanGaps: true, points: { show: false } }],
    }, [[], []]);
  }

  /** Show the values under the cursor next to the legend (uPlot's own legend is off). */
  function latencyReadout(u) {
    const i = u.cursor.idx, el = $('lat-readout');
    if (i == null || !u.data[0].length) { setText(el, ''); return; }
    const at = Math.round(u.data[0][i] - xWin[1]);
    const near = (k) => {              // the merged x mixes chunks and quantiles: look around
      for (let d = 0; d < 40; d++) {
        for (const j of [i - d, i + d]) if (isNum(u.data[k][j])) return u.data[k][j];
      }
      return null;
    };
    setText(el, at + ' s: chunk ' + fmt(near(1), 1) + ' · p50 ' + fmt(near(2), 1) +
      ' · p99 ' + fmt(near(3), 1) + ' ms');
  }

  /** A chart's plot width in CSS pixels (its data area, axes left out). */
  const plotWidth = (u) => Math.max(30, ((u && u.bbox && u.bbox.width) || 0) / (devicePixelRatio || 1) || 600);

  /** rows [t, ..., v at column col, ...] (sorted by t) reduced to the min and the max of v in
   *  each pixel column of a `span`-second window that is `px` wide, in the order they occurred:
   *  a line through them covers every value each column holds, so spikes stay visible. Columns
   *  are anchored to absolute time, so the picture does not shimmer as it scrolls. Returns
   *  [t[], v[]]. */
  function minMaxColumns(rows, col, span, px) {
    const xs = [], ys = [], w = span / px;
    let key = NaN, tMin = 0, vMin = 0, tMax = 0, vMax = 0, have = false;
    const flush = () => {
      if (!have) return;
      if (tMin === tMax) { xs.push(tMin); ys.push(vMin); }
      else if (tMin < tMax) { xs.push(tMin, tMax); ys.push(vMin, vMax); }
      else { xs.push(tMax, tMin); ys.push(vMax, vMin); }
    };
    for (let i = 0; i < rows.length; i++) {
      const r = rows[i];
      if (!Array.isArray(r)) continue;
      const t = r[0], v = r[col];
      if (!isNum(t) || !isNum(v)) continue;
      const k = Math.floor(t / w);
      if (k !== key) {
        flush();
        key = k; have = true; tMin = tMax = t; vMin = vMax = v;
      } else if (v < vMin) { vMin = v; tMin = t; } else if (v > vMax) { vMax = v; tMax = t; }
    }
    flush();
    return [xs, ys];
  }

  /** chunks (reduced per pixel column) and quantiles have their own times: merge them on one x,
   *  nulls elsewhere; the floor, a constant, at both ends. */
  function latencyData() {
    const l = obj(state.latency), q = arr(l.quantiles);
    const floor = isNum(l.floor_ms) ? l.floor_ms : null;
    const [cx, cy] = minMaxColumns(arr(l.chunks), 1, historyS(), plotWidth(charts.latency));
    const n = cx.length + q.length;
    const x = new Array(n), e = new Array(n), p50 = new Array(n), p99 = new Array(n), fl = new Array(n);
    let i = 0, j = 0, k = 0;
    while (i < cx.length || j < q.length) {
      const r = j < q.length ? arr(q[j]) : null;
      if (!r || (i < cx.length && !(cx[i] > r[0]))) {
        x[k] = cx[i]; e[k] = cy[i]; p50[k] = null; p99[k] = null; i++;
      } else {
        x[k] = r[0]; e[k] = null; p50[k] = r[1] ?? null; p99[k] = r[2] ?? null; j++;
      }
      fl[k] = null;
      k++;
    }
    if (n) { fl[0] = floor; fl[n - 1] = floor; }
    return [x, e, p50, p99, fl];
  }

  /** Average rows [t, ...] into time buckets when there are more rows than ~2 px each.
   *  Buckets are anchored to absolute time so the picture does not shimmer as it scrolls. */
  function downsample(rows, maxPts) {
    if (rows.length <= maxPts) return rows;
    const w = historyS() / maxPts, out = [];
    let key = null, acc = null, n = 0;
    const flush = () => { if (acc) { for (let c = 0; c < acc.length; c++) acc[c] /= n; out.push(acc); } };
    for (const r of rows) {
      const k = Math.floor(r[0] / w);
      if (k !== key) {
        flush();
        key = k; n = 1; acc = r.map((v) => (isNum(v) ? v : 0));
      } else {
        n++;
        for (let c = 0; c < acc.length; c++) acc[c] += isNum(r[c]) ? r[c] : 0;
      }
    }
    flush();
    return out;
  }

  /** Recreates the stacked chart only when the list of parts itself changes (normally never). */
  function ensureBreakdownChart() {
    const parts = arr(obj(state.breakdown).parts);
    const sig = partsSig(parts);
    if (charts.breakdown && charts.breakdownSig === sig) return;
    if (charts.breakdown) charts.breakdown.destroy();
    charts.breakdown = null;
    charts.breakdownSig = sig;
    if (!parts.length) return;
    // Stacking: series k plots the running sum of parts 1..k; each band fills between
    // series k+1 (upper edge) and series k (lower edge) in the upper series' colour.
    const series = [{}], bands = [];
    parts.forEach((p, i) => {
      const col = PART_COLOURS[i % PART_COLOURS.length];
      series.push({ label: String(obj(p).label ?? obj(p).key), stroke: col, fill: col + 'd0',
        width: 0.5, points: { show: false } });
      if (i > 0) bands.push({ series: [i + 1, i] });
    });
    charts.breakdown = makeChart('chart-breakdown', {
      scales: { x: timeScale, y: { range: zeroTo(5) } },
      axes: [timeAxis(), valueAxis()],
      series, bands,
    }, parts.map(() => []).concat([[]]));
  }

  function breakdownData() {
    const b = obj(state.breakdown), np = arr(b.parts).length;
    const rows = downsample(arr(b.chunks).filter(Array.isArray),
      Math.max(30, Math.floor(plotWidth(charts.breakdown) / 2)));
    const data = [rows.map((r) => r[0])];
    for (let p = 0; p < np; p++) data.push(new Array(rows.length));
    rows.forEach((r, k) => {
      let acc = 0;
      for (let p = 0; p < np; p++) {
        acc += isNum(r[2 + p]) ? r[2 + p] : 0;
        data[p + 1][k] = acc;
      }
    });
    return data;
  }

  let histRange = [0, 1], histSig = '';
  /** The histogram's data, or null when it is what the chart already shows. */
  function histData() {
    const hg = obj(obj(state.compute).histogram), e = arr(hg.edges_ms), c = arr(hg.counts);
    const sig = e.join() + '|' + c.join();
    if (sig === histSig) return null;
    histSig = sig;
    const n = Math.min(c.length, e.length - 1);
    const x = [], y = [];
    for (let i = 0; i < n; i++) { x.push((e[i] + e[i + 1]) / 2); y.push(isNum(c[i]) ? c[i] : 0); }
    histRange = n > 0 ? [e[0], e[n]] : [0, 1];
    return [x, y];
  }

  function procData() {
    return minMaxColumns(arr(obj(state.compute).chunks), 1, historyS(), plotWidth(charts.proc));
  }

  // ---------------------------------------------------------------- spectrograms
  const LUT = buildLut([[0, [0, 0, 4]], [0.2, [40, 11, 84]], [0.4, [101, 21, 110]],
    [0.6, [159, 42, 99]], [0.75, [212, 72, 66]], [0.88, [245, 125, 21]], [1, [252, 255, 164]]]);
  // side -> {canvas, ctx, cols, nb, frameS, k: newest column's frame index, lastT: newest frame
  // painted, lastK: its column's frame index}: one pixel per frame and band, opaque, scaled up
  // onto the visible canvas
  const spec = {};

  function buildLut(stops) {           // 256 RGB entries of an inferno-like map
    const lut = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) {
      const f = i / 255;
      let k = 0;
      while (k < stops.length - 2 && f > stops[k + 1][0]) k++;
      const [f0, c0] = stops[k], [f1, c1] = stops[k + 1], a = (f - f0) / (f1 - f0);
      for (let ch = 0; ch < 3; ch++) lut[i * 3 + ch] = c0[ch] + (c1[ch] - c0[ch]) * a;
    }
    return lut;
  }

  function specReset() { for (const side in spec) spec[side].k = null; }

  function sizeCanvas(cv) {
    const r = devicePixelRatio || 1;
    const w = Math.max(1, Math.round(cv.clientWidth * r)), hh = Math.max(1, Math.round(cv.clientHeight * r));
    if (cv.width !== w || cv.height !== hh) { cv.width = w; cv.height = hh; }
    cv._labels = '';                  // a resized canvas is blank: labels again
  }

  function drawSpectrogram(side) {
    const cv = $('spec-' + side), r = devicePixelRatio || 1;
    const ctx = cv._ctx || (cv._ctx = cv.getContext('2d'));
    const W = cv.width, H = cv.height, L = Math.round(30 * r), B = Math.round(13 * r);
    const snd = obj(state.sound), bands = arr(snd.bands_hz), frames = arr(obj(snd.frames)[side]);
    const nb = bands.length;
    const labels = W + 'x' + H + '|' + bands.join();
    if (cv._labels !== labels) {      // the frame around the plot: only when size or bands change
      cv._labels = labels;
      ctx.fillStyle = '#0b0d12';
      ctx.fillRect(0, 0, W, H);
      drawSpecLabels(ctx, bands, W, H, L, B, r);
    }
    if (!nb) return;
    const frameS = (isNum(snd.frame_ms) && snd.frame_ms > 0 ? snd.frame_ms : 100) / 1000;
    const cols = Math.max(1, Math.min(2000, Math.round(FRAMES_KEEP_S / frameS)));
    let s = spec[side];
    if (!s || s.cols !== cols || s.nb !== nb || s.frameS !== frameS) {
      const c = document.createElement('canvas');
      c.width = cols; c.height = nb;
      s = spec[side] = { canvas: c, ctx: c.getContext('2d'), cols, nb, frameS, k: null, lastT: -Infinity,
        lastK: -Infinity, col: new ImageData(1, nb) };
    }
    // column c of the image holds frame index kNow - (cols - 1 - c); frame index = floor(t / frameS)
    const kNow = Math.floor(nowT() / frameS);
    const sc = s.ctx;
    const bg = 'rgb(' + SPEC_BG.join(',') + ')';
    if (s.k === null || kNow - s.k >= cols || kNow < s.k) {
      sc.fillStyle = bg;
      sc.fillRect(0, 0, cols, nb);
      s.lastT = -Infinity;
      s.lastK = -Infinity;
    } else if (kNow > s.k) {          // scroll left by the columns time moved on, blank the new ones
      const d = kNow - s.k;
      sc.globalCompositeOperation = 'copy';
      sc.drawImage(s.canvas, d, 0, cols - d, nb, 0, 0, cols - d, nb);
      sc.globalCompositeOperation = 'source-over';
      sc.fillStyle = bg;
      sc.fillRect(cols - d, 0, d, nb);
    }
    s.k = kNow;
    // paint the frames not painted yet (the newest ones, at the end of the list)
    let i = frames.length;
    while (i > 0 && !(arr(frames[i - 1])[0] <= s.lastT)) i--;
    const px = s.col.data;
    for (; i < frames.length; i++) {
      const f = arr(frames[i]), t = f[0], db = arr(f[3]);
      if (!isNum(t)) continue;
      s.lastT = t;
      // frames come about every frameS but not exactly: one that lands in the column of the one
      // before takes the next (if time has got there), rather than leave a blank column after it
      let k = Math.floor(t / frameS);
      if (k === s.lastK && k < kNow) k++;
      s.lastK = k;
      const c = cols - 1 - (kNow - k);
      if (!(c >= 0 && c < cols)) continue;
      for (let b = 0; b < nb; b++) {
        const o = (nb - 1 - b) * 4;   // lowest band at the bottom
        if (!isNum(db[b])) { px[o] = SPEC_BG[0]; px[o + 1] = SPEC_BG[1]; px[o + 2] = SPEC_BG[2]; px[o + 3] = 255; continue; }
        const li = Math.round(Math.max(0, Math.min(1, (db[b] - SPEC_DB[0]) / (SPEC_DB[1] - SPEC_DB[0]))) * 255);
        px[o] = LUT[li * 3]; px[o + 1] = LUT[li * 3 + 1]; px[o + 2] = LUT[li * 3 + 2]; px[o + 3] = 255;
      }
      sc.putImageData(s.col, c, 0);
    }
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(s.canvas, L, 0, W - L, H - B);
  }

  function drawSpecLabels(ctx, bands, W, H, L, B, r) {
    ctx.fillStyle = '#8b949e';
    ctx.font = Math.round(10 * r) + 'px system-ui, sans-serif';
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'right';
    const nb = bands.length, ph = H - B;
    if (nb > 1 && bands.every(isNum) && bands[0] > 0) {
      for (const f of [100, 200, 500, 1000, 2000, 5000, 10000, 20000]) {
        if (f < bands[0] || f > bands[nb - 1]) continue;
        let k = 0;
        while (k < nb - 2 && bands[k + 1] < f) k++;   // fractional band index, log-interpolated
        const idx = k + Math.log(f / bands[k]) / Math.log(bands[k + 1] / bands[k]);
        const y = (nb - 1 - idx + 0.5) / nb * ph;
        ctx.fillText(f >= 1000 ? f / 1000 + 'k' : String(f), L - 4 * r, y);
      }
    } else {
      ctx.textAlign = 'center';
      ctx.fillText('no spectrum yet', L + (W - L) / 2, ph / 2);
    }
    ctx.textBaseline = 'bottom';
    ctx.textAlign = 'left';
    ctx.fillText('-10 s', L, H);
    ctx.textAlign = 'right';
    ctx.fillText('now', W, H);
  }


  // ---------------------------------------------------------------- controls
  /* The live settings, read from each update's `control` (inference's heartbeat and its control
   * and voice events) and changed with POST api/control. The panel is written only when the
   * settings differ from what it shows (one string compare per update otherwise); a slider the
   * user is dragging is left alone, and a change is sent on release, not on every input event. */
  const CTL_TOGGLES = [['ctl-bypass', 'bypass'], ['ctl-gate', 'gate'], ['ctl-agc', 'agc']];
  const CTL_SLIDERS = [['ctl-input-gain', 'input_gain_db', ' dB'], ['ctl-output-gain', 'output_gain_db', ' dB'],
    ['ctl-gate-threshold', 'gate_threshold_db', ' dBFS']];
  const CTL_HOLD_MS = 1000;       // after a reply, updates older than it must not undo what it showed
  const ctl = dash.control = { shown: '', holdUntil: 0, editing: new Set(), voices: null, current: null,
    switching: null, posts: 0, renders: 0 };

  const signed = (v, unit) => (isNum(v) ? (v > 0 ? '+' : '') + toFixedEven(v, 1) + unit : DASH);
  const ctlKey = (c) => JSON.stringify([c.controls ?? null, c.voice ?? null, c.loading ?? null, c.last_switch ?? null]);

  function ctlError(text) {
    const el = $('ctl-error');
    const line = text ? String(text).replace(/\s+/g, ' ').slice(0, 300) : '';
    setText(el, line);
    if (el.title !== line) el.title = line;
  }

  /** Show control state `c` ({controls, voice, loading, last_switch}) if it differs from what is shown. */
  function renderControls(c, fromReply) {
    c = obj(c);
    if (!fromReply && performance.now() < ctl.holdUntil) return;
    const key = ctlKey(c);
    if (key === ctl.shown) return;
    ctl.shown = key;
    ctl.renders += 1;
    const v = c.controls && typeof c.controls === 'object' ? c.controls : null;
    for (const [id, k] of CTL_TOGGLES) {
      const el = $(id);
      el.disabled = !v;
      if (v && el.checked !== !!v[k]) el.checked = !!v[k];
    }
    for (const [id, k, unit] of CTL_SLIDERS) {
      const el = $(id);
      el.disabled = !v;
      if (!v || ctl.editing.has(id)) continue;
      if (isNum(v[k]) && Number(el.value) !== v[k]) el.value = String(v[k]);
      setText($(id + '-value'), signed(v[k], unit));
    }
    const panel = $('controls'), by = v && v.bypass ? 'on' : 'off';
    if (panel.dataset.bypass !== by) panel.dataset.bypass = by;
    if (typeof c.voice === 'string') ctl.current = c.voice;
    renderVoices();
  }

  function voiceLabel(checkpoint) {
    if (!checkpoint) return '(the embedded demo voice)';
    const known = arr(ctl.voices).find((x) => obj(x).checkpoint === checkpoint);
    return known ? String(known.name) : String(checkpoint).split('/').pop();
  }

  /** The <select>: every voice in voices_dir, and the current one (selected) if it is not among them. */
  function renderVoices() {
    const sel = $('ctl-voice'), cur = ctl.current;
    const list = arr(ctl.voices).map((x) => [String(obj(x).checkpoint ?? ''), String(obj(x).name ?? '')]);
    if (cur !== null && !list.some(([ck]) => ck === cur)) list.unshift([cur, voiceLabel(cur)]);
    const want = JSON.stringify(list);
    if (sel._list !== want) {
      const keep = sel.value;
      sel.replaceChildren(...list.map(([ck, name]) => {
        const o = h('option', '', name);
        o.value = ck;
        if (!ck) o.disabled = true;    // the demo voice cannot be asked for by name
        return o;
      }));
      sel._list = want;
      if (keep && list.some(([ck]) => ck === keep)) sel.value = keep;
      else if (cur !== null) sel.value = cur;
    }
    if (sel._cur !== cur && cur !== null) { sel.value = cur; sel._cur = cur; }
    sel.disabled = !list.length;
    $('ctl-voice-switch').disabled = !list.some(([ck]) => ck) || !!ctl.switching;
  }

  /** POST a control request; the reply's state is shown at once. Resolves to the reply or null. */
  async function ctlPost(body) {
    ctl.posts += 1;
    let r, j = null;
    try {
      r = await fetch(apiUrl('api/control'), { method: 'POST', cache: 'no-store',
        headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
      j = await r.json().catch(() => null);
    } catch (e) {
      ctlError('the dashboard did not answer: ' + e.message);
      ctl.shown = '';                        // show the server's values again with the next update
      return null;
    }
    j = obj(j);
    if (j.state && typeof j.state === 'object') {
      ctl.shown = '';
      ctl.holdUntil = performance.now() + CTL_HOLD_MS;
      if (Array.isArray(j.state.voices)) ctl.voices = j.state.voices;
      renderControls(j.state, true);
    } else {
      ctl.shown = '';
      renderControls(obj(state.control), true);   // a refused request changed nothing: undo the widget
    }
    if (!r.ok || !j.ok) ctlError(j.error || 'HTTP ' + r.status);
    else ctlError('');
    return j;
  }

  /** GET api/control: the state and the voices (retried until inference answers). */
  async function ctlFetch() {
    try {
      const r = await fetch(apiUrl('api/control'), { cache: 'no-store' });
      const j = obj(await r.json().catch(() => null));
      if (!r.ok || !j.state) throw new Error(j.error || 'HTTP ' + r.status);
      ctl.voices = arr(j.state.voices);
      ctl.shown = '';
      renderControls(j.state, true);
      return j.state;
    } catch (e) {
      setText($('ctl-voice-status'), 'voices unavailable');
      setTimeout(ctlFetch, 5000);
      return null;
    }
  }

  async function switchVoice() {
    const checkpoint = $('ctl-voice').value;
    if (!checkpoint || ctl.switching) return;
    const reply = await ctlPost({ cmd: 'voice', checkpoint });
    if (!reply || !reply.ok) return;
    ctl.switching = checkpoint;
    renderVoices();
    setText($('ctl-voice-status'), 'loading\u2026');
    const deadline = performance.now() + 300000;
    const poll = async () => {
      const st = await (async () => {
        try {
          const r = await fetch(apiUrl('api/control'), { cache: 'no-store' });
          return r.ok ? obj(obj(await r.json()).state) : null;
        } catch (e) { return null; }
      })();
      const last = st ? obj(st.last_switch) : {};
      if (st && !st.loading && last.voice !== undefined) {
        ctl.switching = null;
        if (Array.isArray(st.voices)) ctl.voices = st.voices;
        ctl.shown = '';
        renderControls(st, true);
        if (last.ok) {
          setText($('ctl-voice-status'), 'loaded' + (isNum(last.load_ms) ? ' in ' + toFixedEven(last.load_ms / 1000, 2) + ' s' : ''));
          ctlError('');
        } else {
          setText($('ctl-voice-status'), 'failed');
          ctlError('voice switch failed: ' + (last.reason || 'unknown reason'));
        }
        return;
      }
      if (performance.now() > deadline) {
        ctl.switching = null;
        renderVoices();
        setText($('ctl-voice-status'), '');
        ctlError('no word from inference on the voice switch after 5 min');
        return;
      }
      setTimeout(poll, 500);
    };
    setTimeout(poll, 300);
  }

  function setupControls() {
    for (const [id, k] of CTL_TOGGLES) {
      $(id).addEventListener('change', (ev) => ctlPost({ cmd: 'set', values: { [k]: ev.target.checked } }));
    }
    for (const [id, k, unit] of CTL_SLIDERS) {
      const el = $(id);
      // while dragging: the number follows, nothing is sent, updates leave the slider alone
      el.addEventListener('input', () => { ctl.editing.add(id); setText($(id + '-value'), signed(Number(el.value), unit)); });
      el.addEventListener('change', async () => {
        const j = await ctlPost({ cmd: 'set', values: { [k]: Number(el.value) } });
        ctl.editing.delete(id);                  // now the reply's value (or, without one, the last known)
        ctl.shown = '';
        renderControls(j && j.state ? j.state : obj(state.control), true);
      });
    }
    $('ctl-voice-switch').addEventListener('click', switchVoice);
    ctlFetch();
  }

  // ---------------------------------------------------------------- start
  function start() {
    createCharts();
    for (const side of ['input', 'output']) {
      sizeCanvas($('spec-' + side));
      resizer.observe($('spec-' + side));
    }
    setupControls();
    refresh(true);                      // render the empty shape at once
    setInterval(renderRate, 1000);
    loading = true;                     // buffer stream updates until the snapshot is in
    openStream();
    fetchState();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
