/* Permiso admin console: plain ES2020, no dependencies, served by the admin plane at /console
 * under a strict CSP (no inline script or style), so every element is built here with
 * createElement/textContent; server text never goes through innerHTML.
 *
 * The admin key lives in this page's memory and, when "keep for this tab" is ticked, in
 * sessionStorage; it is sent only as the X-Admin-Api-Key header of same-origin fetch() calls
 * to /auth/admin/..., never in a URL, a cookie or localStorage. One-time secrets (a new API
 * key or client secret) exist only in the DOM of the view that shows them.
 *
 * Stable selectors for browser tests:
 *   login        #admin-key, #remember-key, #login, #login-error
 *   navigation   #nav-services, #nav-audit, #nav-fleet, #logout
 *   errors       #error-banner (#error-text, #error-dismiss)
 *   services     #service-search, #page-size, tr.service-row[data-service-id], #next-page,
 *                #prev-page, #page-info, #new-service
 *   create       #create-form, #create-name, #create-scopes, #create-environment,
 *                #create-description, #create-rpm, #create-rph, #create-ips, #create-submit,
 *                #create-error, #open-created
 *   one-time     #one-time, #one-time-key, #one-time-secret, #copy-key, #copy-secret,
 *                #one-time-export, #copy-export, #one-time-done
 *   detail       #service-detail[data-service-id], tr.key-row[data-key-id][data-status][data-in-use],
 *                tr.secret-row[data-key-id][data-status], span.badge-in-use, #rotate-grace,
 *                #rotate-key, #rotate-secret, button.revoke-key[data-key-id],
 *                #confirm (#confirm-yes, #confirm-no), #patch-form, #patch-scopes, #patch-rpm,
 *                #patch-rph, #patch-ips, #patch-submit, #patch-error, #disable-service,
 *                #enable-service, #write-status, #warnings, #check-propagation, #propagation-result
 *   audit        #audit-actor, #audit-action, #audit-target, #audit-since, #audit-until,
 *                #audit-limit, #audit-apply, #audit-reset, tr.audit-row[data-seq][data-action]
 *                (tr.chain-broken on a failed entry), #audit-prev, #audit-next, #verify-chain,
 *                #expect-head, #chain-status[data-state=idle|running|ok|broken|error], #chain-head,
 *                #copy-head, #show-broken
 *   fleet        #fleet-summary, #propagation[data-complete], tr.sidecar-row[data-instance-id]
 *                [data-status], #fleet-empty, #fleet-refresh, #change-version, #change-check,
 *                #change-result
 */
'use strict';

// ---------------------------------------------------------------- BLAKE3 (hash, keyed, derive_key)
const B3_IV = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
const B3_PERM = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
const CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8, KEYED_HASH = 16, DERIVE_KEY_CONTEXT = 32, DERIVE_KEY_MATERIAL = 64;
// The message word order of each of the 7 rounds.
const B3_SCHEDULE = (() => {
  const s = [];
  let p = Array.from({ length: 16 }, (_, i) => i);
  for (let r = 0; r < 7; r++) { s.push(p); p = B3_PERM.map((i) => p[i]); }
  return s;
})();

function b3Compress(cv, m, counter, blockLen, flags) {
  const v = new Uint32Array(16);
  v.set(cv, 0); v.set(B3_IV.subarray(0, 4), 8);
  v[12] = counter >>> 0; v[13] = Math.floor(counter / 0x100000000) >>> 0; v[14] = blockLen; v[15] = flags;
  const g = (a, b, c, d, x, y) => {
    v[a] = v[a] + v[b] + x; v[d] ^= v[a]; v[d] = (v[d] >>> 16) | (v[d] << 16);
    v[c] = v[c] + v[d]; v[b] ^= v[c]; v[b] = (v[b] >>> 12) | (v[b] << 20);
    v[a] = v[a] + v[b] + y; v[d] ^= v[a]; v[d] = (v[d] >>> 8) | (v[d] << 24);
    v[c] = v[c] + v[d]; v[b] ^= v[c]; v[b] = (v[b] >>> 7) | (v[b] << 25);
  };
  for (const s of B3_SCHEDULE) {
    g(0, 4, 8, 12, m[s[0]], m[s[1]]); g(1, 5, 9, 13, m[s[2]], m[s[3]]);
    g(2, 6, 10, 14, m[s[4]], m[s[5]]); g(3, 7, 11, 15, m[s[6]], m[s[7]]);
    g(0, 5, 10, 15, m[s[8]], m[s[9]]); g(1, 6, 11, 12, m[s[10]], m[s[11]]);
    g(2, 7, 8, 13, m[s[12]], m[s[13]]); g(3, 4, 9, 14, m[s[14]], m[s[15]]);
  }
  for (let i = 0; i < 8; i++) { v[i] ^= v[i + 8]; v[i + 8] ^= cv[i]; }
  return v;
}

// The 16 little-endian words of the 64-byte block at `off`, zero-padded past `end`.
function b3Block(bytes, off, end) {
  const w = new Uint32Array(16);
  for (let i = 0; i < 64 && off + i < end; i++) w[i >> 2] |= bytes[off + i] << (8 * (i & 3));
  return w;
}

// A chunk's or parent's last compression, kept open: its chaining value, or the root output.
function b3Output(cv, block, counter, blockLen, flags) {
  return {
    cv: () => b3Compress(cv, block, counter, blockLen, flags).subarray(0, 8),
    root(outLen) {
      const out = new Uint8Array(outLen);
      for (let n = 0, pos = 0; pos < outLen; n++) {
        const w = b3Compress(cv, block, n, blockLen, flags | ROOT);
        for (let i = 0; i < 64 && pos < outLen; i++, pos++) out[pos] = w[i >> 2] >>> (8 * (i & 3));
      }
      return out;
    },
  };
}

function b3Chunk(key, bytes, off, len, counter, flags) {
  let cv = key, start = CHUNK_START;
  const end = off + len;
  for (; end - off > 64; off += 64, start = 0) {
    cv = b3Compress(cv, b3Block(bytes, off, end), counter, 64, flags | start).slice(0, 8);
  }
  return b3Output(cv, b3Block(bytes, off, end), counter, end - off, flags | start | CHUNK_END);
}

function b3Parent(left, right, key, flags) {
  const block = new Uint32Array(16);
  block.set(left, 0); block.set(right, 8);
  return b3Output(key, block, 0, 64, flags | PARENT);
}

// The whole BLAKE3 tree over `bytes` (1024-byte chunks, subtrees merged as chunks complete).
function b3Hash(key, flags, bytes, outLen = 32) {
  const stack = [];
  let chunk = 0, off = 0;
  for (; bytes.length - off > 1024; chunk++, off += 1024) {
    let cv = b3Chunk(key, bytes, off, 1024, chunk, flags).cv();
    for (let total = chunk + 1; total % 2 === 0; total /= 2) cv = b3Parent(stack.pop(), cv, key, flags).cv();
    stack.push(cv);
  }
  let out = b3Chunk(key, bytes, off, bytes.length - off, chunk, flags);
  while (stack.length) out = b3Parent(stack.pop(), out.cv(), key, flags);
  return out.root(outLen);
}

const utf8 = (s) => new TextEncoder().encode(s);
const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
function fromHex(s) {
  if (typeof s !== 'string' || s.length % 2 || !/^[0-9a-fA-F]*$/.test(s)) return null;
  const b = new Uint8Array(s.length / 2);
  for (let i = 0; i < b.length; i++) b[i] = parseInt(s.substr(2 * i, 2), 16);
  return b;
}
const b3KeyWords = (key32) => b3Block(key32, 0, 32).slice(0, 8);
const blake3 = {
  hash: (bytes, outLen) => b3Hash(B3_IV, 0, bytes, outLen),
  keyed: (key32, bytes, outLen) => b3Hash(b3KeyWords(key32), KEYED_HASH, bytes, outLen),
  // derive_key mode; deriver(context) keeps the context key for many inputs.
  deriver(context) {
    const ctxKey = b3KeyWords(b3Hash(B3_IV, DERIVE_KEY_CONTEXT, utf8(context), 32));
    return (bytes, outLen) => b3Hash(ctxKey, DERIVE_KEY_MATERIAL, bytes, outLen);
  },
  deriveKey: (context, bytes, outLen) => blake3.deriver(context)(bytes, outLen),
};

// ---------------------------------------------------------------- audit chain (crates/core/src/audit.rs)
const GENESIS = '0'.repeat(64);
const auditDerive = blake3.deriver('permiso audit chain v1');

// Code point order, which is UTF-8 byte order (serde_json's BTreeMap keys).
function cmpCodePoints(a, b) {
  const x = Array.from(a, (c) => c.codePointAt(0)), y = Array.from(b, (c) => c.codePointAt(0));
  for (let i = 0; i < x.length && i < y.length; i++) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

// serde_json's compact output of a Value: object keys sorted, strings escaped as JSON.stringify
// does (\" \\ \b \f \n \r \t, other controls \u00xx; '/' and non-ASCII as is).
function canonJson(v) {
  if (v === null || typeof v === 'boolean' || typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number') {
    if (!Number.isSafeInteger(v)) throw new Error(`the entry holds a number (${v}) this page cannot reproduce exactly`);
    return String(v);
  }
  if (Array.isArray(v)) return '[' + v.map(canonJson).join(',') + ']';
  if (typeof v === 'object') {
    return '{' + Object.keys(v).sort(cmpCodePoints).map((k) => JSON.stringify(k) + ':' + canonJson(v[k])).join(',') + '}';
  }
  throw new Error('unexpected value in an audit entry');
}

// hash = BLAKE3 derive_key("permiso audit chain v1", prev_hash || json{seq,at,actor,action,target,source_ip,change}).
function auditEntryHash(prevHex, e) {
  const str = (s) => (s == null ? 'null' : canonJson(String(s)));
  const covered = `{"seq":${canonJson(e.seq)},"at":${canonJson(e.at)},"actor":${canonJson(e.actor)},` +
    `"action":${canonJson(e.action)},"target":${str(e.target)},"source_ip":${str(e.source_ip)},"change":${canonJson(e.change)}}`;
  const body = utf8(covered), input = new Uint8Array(32 + body.length);
  input.set(fromHex(prevHex), 0); input.set(body, 32);
  return toHex(auditDerive(input));
}

// Checks the chain from seq 1 in order, like core::audit::Verifier. push() answers null or the break.
function makeVerifier() {
  let prev = GENESIS, next = 1;
  return {
    push(e) {
      if (e.seq !== next) return { seq: e.seq, what: 'sequence gap', expected: `seq ${next}`, got: `seq ${e.seq}` };
      const link = String(e.prev_hash).toLowerCase();
      if (link !== prev) return { seq: e.seq, what: 'its prev_hash is not the previous entry\'s hash (expected: previous hash; got: its prev_hash)', expected: prev, got: link };
      const h = auditEntryHash(prev, e), got = String(e.hash).toLowerCase();
      if (h !== got) return { seq: e.seq, what: 'its fields do not hash to its stored hash (expected: recomputed here; got: stored)', expected: h, got };
      prev = h; next += 1;
      return null;
    },
    head: () => ({ seq: next - 1, hash: prev, entries: next - 1 }),
  };
}

if (typeof module === 'object' && module.exports) {
  module.exports = { blake3, toHex, fromHex, utf8, canonJson, auditEntryHash, makeVerifier };
}

// ---------------------------------------------------------------- DOM helpers
const $ = (sel, root = document) => root.querySelector(sel);

// h('tag', {attrs}, ...children): text children become text nodes; on* props take functions.
function h(tag, props, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'value' || k === 'checked' || k === 'selected') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat(Infinity)) if (kid != null && kid !== false) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}

function toDate(v) {
  if (v == null || v === '') return null;
  const d = typeof v === 'number' ? new Date(v * 1000) : new Date(v);
  return Number.isNaN(d.getTime()) ? null : d;
}
const fmtTime = (v) => { const d = toDate(v); return d ? d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z') : (v == null ? '—' : String(v)); };
function ago(v) {
  const d = toDate(v);
  if (!d) return '';
  let s = Math.round((Date.now() - d.getTime()) / 1000);
  const future = s < 0; s = Math.abs(s);
  const t = s < 60 ? `${s}s` : s < 3600 ? `${Math.round(s / 60)}m` : s < 86400 ? `${Math.round(s / 3600)}h` : `${Math.round(s / 86400)}d`;
  return future ? `in ${t}` : `${t} ago`;
}
const timeCell = (v) => h('td', { class: 'time' }, v == null ? h('span', { class: 'muted' }, '—')
  : [h('time', { datetime: toDate(v) ? toDate(v).toISOString() : String(v) }, fmtTime(v)), h('span', { class: 'muted rel' }, ago(v))]);
const badge = (text, cls) => h('span', { class: `badge ${cls || ''}` }, text);
const chips = (list) => (list && list.length ? list.map((s) => h('span', { class: 'chip' }, s)) : h('span', { class: 'muted' }, 'none'));
const splitList = (s) => s.split(/[\s,]+/).map((x) => x.trim()).filter(Boolean);
const sameSet = (a, b) => [...a].sort().join('\n') === [...b].sort().join('\n');
const enc = encodeURIComponent;

function selectText(el) {
  const r = document.createRange(); r.selectNodeContents(el);
  const s = window.getSelection(); s.removeAllRanges(); s.addRange(r);
}

// A button that copies `source`'s text; where the clipboard is refused, selects it instead.
function copyButton(id, source, hint) {
  const btn = h('button', { id, type: 'button', class: 'small', onclick: async () => {
    try {
      await navigator.clipboard.writeText(source.textContent);
      btn.textContent = 'Copied'; btn.classList.add('copied'); hint.hidden = true;
    } catch (_) {
      selectText(source); btn.textContent = 'Copy';
      hint.textContent = 'The browser refused the clipboard: the text is selected, press Ctrl+C (⌘C).'; hint.hidden = false;
    }
  } }, 'Copy');
  return btn;
}

// ---------------------------------------------------------------- state, key, API
const KEY_SLOT = 'permiso.console.admin-key';
const S = {
  key: null, gen: 0, loginMessage: '', afterLogin: null,
  list: { search: '', cursor: null, stack: [], next: null, limit: 25 },
  audit: { filters: {}, after: 0, stack: [], next: null, limit: 100, chain: null },
};

function setKey(key, keep) {
  S.key = key;
  try { if (keep) sessionStorage.setItem(KEY_SLOT, key); else sessionStorage.removeItem(KEY_SLOT); } catch (_) { /* memory only */ }
}
function clearKey() {
  S.key = null;
  // A chain verified in this session says nothing about the log later on.
  S.audit.chain = null;
  try { sessionStorage.removeItem(KEY_SLOT); } catch (_) { /* nothing stored */ }
}

class ApiError extends Error {
  constructor(status, code, description) { super(description); this.status = status; this.code = code; this.description = description; }
}

// One call to the admin API. A 401 (other than the login check) ends the session.
async function api(method, path, body, opts = {}) {
  const key = opts.key || S.key;
  // Signed out (a view still finishing, a chain check still paging): send nothing rather
  // than an empty key, which would be a failed login audited against this address.
  if (!key) throw new ApiError(401, 'signed_out', 'signed out: sign in again');
  const headers = { 'X-Admin-Api-Key': key, Accept: 'application/json' };
  const init = { method, headers, credentials: 'omit', cache: 'no-store', redirect: 'error', referrerPolicy: 'no-referrer' };
  if (body !== undefined) { headers['Content-Type'] = 'application/json'; init.body = JSON.stringify(body); }
  let resp;
  try { resp = await fetch(path, init); } catch (e) {
    throw new ApiError(0, 'network_error', `the admin plane did not answer (${e.message})`);
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!resp.ok) {
    const err = new ApiError(resp.status, (data && data.error) || `http_${resp.status}`,
      (data && data.error_description) || text.slice(0, 300) || resp.statusText || 'request failed');
    if (resp.status === 401 && !opts.login) sessionLost(err);
    throw err;
  }
  if (data === null) throw new ApiError(resp.status, 'bad_response', 'the admin plane answered something that is not JSON');
  return data;
}

function sessionLost(err) {
  clearKey();
  S.loginMessage = `Signed out: ${err.description}`;
  // Several calls may fail at once: the first one moves to the login page.
  if (location.hash !== '#/login') { S.afterLogin = location.hash; location.hash = '#/login'; }
}

function showError(e) {
  if (e && e.status === 401) return; // the login page shows it
  const text = e instanceof ApiError ? `${e.code}${e.status ? ` (HTTP ${e.status})` : ''}: ${e.description}` : `error: ${e && e.message ? e.message : e}`;
  $('#error-text').textContent = text;
  $('#error-banner').hidden = false;
}
const hideError = () => { $('#error-banner').hidden = true; $('#error-text').textContent = ''; };

// Runs an action from a button: disabled meanwhile, errors to the banner.
async function busy(btn, fn) {
  if (btn) btn.disabled = true;
  try { await fn(); } catch (e) { showError(e); } finally { if (btn) btn.disabled = false; }
}

// ---------------------------------------------------------------- routing
function go(hash) {
  if (location.hash === hash) route(); else location.hash = hash;
}

function route() {
  const gen = ++S.gen;
  const hash = location.hash || '#/services';
  const parts = hash.replace(/^#\/?/, '').split('/').map((p) => { try { return decodeURIComponent(p); } catch (_) { return p; } });
  const view = $('#view');
  view.replaceChildren(); // drops any one-time secret shown by the previous view
  hideError();
  $('#nav').hidden = !S.key;
  if (!S.key && parts[0] !== 'login') { S.afterLogin = hash; go('#/login'); return; }
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', hash.startsWith(a.getAttribute('href')));
  const page = {
    login: () => viewLogin(view),
    services: () => (parts[1] ? viewService(view, gen, parts[1]) : viewServices(view, gen)),
    create: () => viewCreate(view, gen),
    audit: () => viewAudit(view, gen),
    fleet: () => viewFleet(view, gen, parts[1]),
  }[parts[0]];
  if (!page) { go(S.key ? '#/services' : '#/login'); return; }
  if (parts[0] === 'login' && S.key) { go('#/services'); return; }
  Promise.resolve().then(page).catch(showError);
}

// ---------------------------------------------------------------- login
function viewLogin(view) {
  const input = h('input', { id: 'admin-key', type: 'password', autocomplete: 'off', spellcheck: 'false', placeholder: 'adm_…', 'aria-describedby': 'login-error' });
  const keep = h('input', { id: 'remember-key', type: 'checkbox', checked: false });
  const err = h('p', { id: 'login-error', class: 'form-error', role: 'alert', hidden: !S.loginMessage }, S.loginMessage);
  S.loginMessage = '';
  const btn = h('button', { id: 'login', type: 'submit', class: 'primary' }, 'Sign in');
  const fail = (msg) => { err.textContent = msg; err.hidden = false; input.focus(); };
  const form = h('form', { class: 'card login', novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) return fail('Type the admin key.');
    if (/[^\x21-\x7e]/.test(key)) return fail('The admin key holds a character an HTTP header cannot carry (spaces or non-ASCII): check what was pasted.');
    btn.disabled = true; btn.textContent = 'Checking…';
    try {
      await api('GET', '/auth/admin/services?limit=1', undefined, { key, login: true });
      input.value = '';
      setKey(key, keep.checked);
      const next = S.afterLogin && !S.afterLogin.startsWith('#/login') ? S.afterLogin : '#/services';
      S.afterLogin = null;
      go(next);
    } catch (e) {
      fail(e.status === 401 || e.status === 403 ? `Sign-in refused: ${e.description}` : `${e.code}: ${e.description}`);
    } finally { btn.disabled = false; btn.textContent = 'Sign in'; }
  } },
  h('h1', {}, 'Sign in'),
  h('p', { class: 'muted' }, 'The admin key ($PERMISO_ADMIN_API_KEY) is kept in this tab only and sent as the X-Admin-Api-Key header.'),
  h('label', { for: 'admin-key' }, 'Admin key'), input,
  h('label', { class: 'check' }, keep, ' Keep it for this tab (sessionStorage, cleared when the tab closes)'),
  err, h('div', { class: 'actions' }, btn));
  view.append(form);
  input.focus();
}

// ---------------------------------------------------------------- services list
function viewServices(view, gen) {
  const L = S.list;
  let seq = 0, timer = null;
  const search = h('input', { id: 'service-search', type: 'search', value: L.search, autocomplete: 'off', placeholder: 'Name (substring) or exact service id', 'aria-label': 'Search services' });
  const size = h('select', { id: 'page-size', 'aria-label': 'Rows per page' }, [10, 25, 50, 100, 200].map((n) => h('option', { value: n, selected: n === L.limit }, `${n} per page`)));
  const tbody = h('tbody');
  const prev = h('button', { id: 'prev-page', type: 'button' }, '← Previous');
  const next = h('button', { id: 'next-page', type: 'button' }, 'Next →');
  const info = h('span', { id: 'page-info', class: 'muted' });
  const restart = () => { L.cursor = null; L.stack = []; load().catch(showError); };
  search.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(() => { L.search = search.value.trim(); restart(); }, 300); });
  size.addEventListener('change', () => { L.limit = Number(size.value); restart(); });
  prev.addEventListener('click', () => { L.cursor = L.stack.length ? L.stack.pop() : null; load().catch(showError); });
  next.addEventListener('click', () => { if (!L.next) return; L.stack.push(L.cursor); L.cursor = L.next; load().catch(showError); });

  view.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Services'), h('a', { id: 'new-service', class: 'button primary', href: '#/create' }, '+ New service')),
    h('form', { class: 'toolbar', role: 'search', onsubmit: (ev) => { ev.preventDefault(); clearTimeout(timer); L.search = search.value.trim(); restart(); } }, search, size),
    h('div', { class: 'table-wrap' }, h('table', { class: 'data' },
      h('thead', {}, h('tr', {}, ['Name', 'Service id', 'Env', 'Scopes', 'State', 'Active keys'].map((t) => h('th', {}, t)))), tbody)),
    h('div', { class: 'pager' }, prev, info, next));

  async function load() {
    const my = ++seq;
    const q = new URLSearchParams({ limit: String(L.limit) });
    if (L.cursor) q.set('cursor', L.cursor);
    if (L.search) q.set('search', L.search);
    prev.disabled = next.disabled = true;
    tbody.replaceChildren(h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'Loading…')));
    const page = await api('GET', `/auth/admin/services?${q}`);
    if (my !== seq || gen !== S.gen) return;
    L.next = page.next_cursor || null;
    const rows = (page.services || []).map((s) => {
      const active = s.keys.filter((k) => k.status === 'active').length, grace = s.keys.filter((k) => k.status === 'grace').length;
      const open = () => go(`#/services/${enc(s.service_id)}`);
      return h('tr', { class: `service-row clickable${s.disabled ? ' disabled' : ''}`, 'data-service-id': s.service_id, tabindex: 0,
        onclick: (ev) => { if (!ev.target.closest('a')) open(); }, onkeydown: (ev) => { if (ev.key === 'Enter') open(); } },
      h('td', {}, h('a', { href: `#/services/${enc(s.service_id)}` }, s.service_name)),
      h('td', {}, h('code', {}, s.service_id)),
      h('td', {}, badge(s.environment, `env-${s.environment}`)),
      h('td', { class: 'chips' }, chips(s.scopes)),
      h('td', {}, s.disabled ? badge('disabled', 'status-revoked') : badge('enabled', 'status-active')),
      h('td', { class: 'num' }, String(active), grace ? h('span', { class: 'muted' }, ` (+${grace} in grace)`) : null));
    });
    tbody.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: 6, class: 'empty' },
      L.search ? `No service matches “${L.search}”.` : 'No service yet.'))]));
    prev.disabled = L.stack.length === 0;
    next.disabled = !L.next;
    info.textContent = `Page ${L.stack.length + 1}${rows.length ? ` · ${rows.length} shown` : ''}`;
  }
  return load();
}

// ---------------------------------------------------------------- one-time secrets panel
// Holds the API key and/or client secret just issued; they live only in this panel's DOM.
function oneTimePanel(slot, serviceId) {
  let items = {};
  const render = () => {
    const rows = [];
    for (const [kind, label] of [['key', 'API key'], ['secret', 'Client secret']]) {
      const it = items[kind];
      if (!it) continue;
      const code = h('code', { id: `one-time-${kind}`, class: 'secret' }, it.value);
      const hint = h('p', { class: 'copy-hint', hidden: true, role: 'status' });
      rows.push(h('div', { class: 'secret-row-item' },
        h('div', { class: 'secret-label' }, `${label} `, h('span', { class: 'muted' }, it.id), it.note ? h('div', { class: 'muted small' }, it.note) : null),
        h('div', { class: 'secret-value' }, code, copyButton(`copy-${kind}`, code, hint)), hint));
    }
    const vars = [];
    if (items.key) vars.push(`KEY=${items.key.value}`);
    vars.push(`SID=${serviceId}`);
    if (items.secret) vars.push(`SECRET=${items.secret.value}`);
    // Single-quoted for the shell, a quote inside written as '\'' (ids and keys hold none today).
    const quote = (v) => (/^[\w=.:-]+$/.test(v) ? v : v.replace(/=(.*)$/, (_, x) => `='${x.replace(/'/g, "'\\''")}'`));
    const exp = h('code', { id: 'one-time-export', class: 'secret' }, `export ${vars.map(quote).join(' ')}`);
    const hint = h('p', { class: 'copy-hint', hidden: true, role: 'status' });
    slot.replaceChildren(h('section', { id: 'one-time', class: 'one-time', role: 'region', 'aria-label': 'Secrets shown once' },
      h('h2', {}, '⚠ Shown once: copy it now — it cannot be shown again'),
      h('p', {}, 'Permiso keeps only a hash. When you leave this page these values are gone; a lost key means another rotation.'),
      rows,
      h('div', { class: 'secret-row-item' }, h('div', { class: 'secret-label' }, 'Shell'), h('div', { class: 'secret-value' }, exp, copyButton('copy-export', exp, hint)), hint),
      h('div', { class: 'actions' }, h('button', { id: 'one-time-done', type: 'button', onclick: () => { items = {}; slot.replaceChildren(); } }, 'I have stored them — hide'))));
    slot.scrollIntoView({ block: 'nearest' });
  };
  // Only what one write issued: a credential hidden or shown by an earlier write is not
  // brought back (`add` puts a second credential of the same write beside the first).
  return {
    set(kind, item) { items = { [kind]: item }; render(); },
    add(kind, item) { items[kind] = item; render(); },
  };
}

// After a write: its sync version, warnings, and a check of which sidecars hold it.
function writeStatus(slot, what, full) {
  // Only what the status line needs: never the one-time secrets a create or rotate returned.
  const resp = { version: full.version, warnings: full.warnings };
  const result = h('span', { id: 'propagation-result', class: 'muted' });
  const check = h('button', { id: 'check-propagation', type: 'button', class: 'small', onclick: () => busy(check, async () => {
    const c = await api('GET', `/auth/admin/changes/${enc(resp.version)}`);
    result.textContent = `${c.complete ? '✓ reached every live sidecar' : '… not everywhere yet'}: ${c.summary}` +
      (c.pending && c.pending.length ? `; pending: ${c.pending.join(', ')}` : '') + (c.stale && c.stale.length ? `; stale (not counted): ${c.stale.join(', ')}` : '');
  }) }, 'Check sidecars');
  const warnings = resp.warnings && resp.warnings.length
    ? h('ul', { id: 'warnings', class: 'warnings' }, resp.warnings.map((w) => h('li', {}, w))) : null;
  slot.replaceChildren(h('div', { id: 'write-status', class: 'notice', role: 'status' },
    h('p', {}, h('strong', {}, what), ` — sync version ${resp.version}. `, check, ' ', result), warnings));
}

// ---------------------------------------------------------------- create
function viewCreate(view, gen) {
  const f = {
    name: h('input', { id: 'create-name', required: true, maxlength: 100, autocomplete: 'off', placeholder: 'trading-dashboard' }),
    scopes: h('input', { id: 'create-scopes', autocomplete: 'off', placeholder: 'trade:read account:read' }),
    env: h('select', { id: 'create-environment' }, h('option', { value: 'live' }, 'live (svc_live_ keys)'), h('option', { value: 'test' }, 'test (svc_test_ keys)')),
    desc: h('textarea', { id: 'create-description', rows: 2, maxlength: 1000 }),
    rpm: h('input', { id: 'create-rpm', inputmode: 'numeric', placeholder: 'no limit' }),
    rph: h('input', { id: 'create-rph', inputmode: 'numeric', placeholder: 'no limit' }),
    ips: h('input', { id: 'create-ips', autocomplete: 'off', placeholder: 'anywhere (e.g. 10.0.0.0/8 192.168.1.7)' }),
  };
  const err = h('p', { id: 'create-error', class: 'form-error', role: 'alert', hidden: true });
  const submit = h('button', { id: 'create-submit', type: 'submit', class: 'primary' }, 'Create service');
  const field = (label, el, help) => h('div', { class: 'field' }, h('label', { for: el.id }, label), el, help ? h('small', { class: 'muted' }, help) : null);
  const form = h('form', { id: 'create-form', class: 'card form-grid', novalidate: true, onsubmit: (ev) => {
    ev.preventDefault();
    err.hidden = true;
    let body;
    try {
      if (!f.name.value.trim()) throw new Error('The service name is required.');
      body = { service_name: f.name.value.trim(), scopes: splitList(f.scopes.value), environment: f.env.value };
      if (f.desc.value.trim()) body.description = f.desc.value.trim();
      const rpm = parseLimit(f.rpm.value, 'Requests per minute'), rph = parseLimit(f.rph.value, 'Requests per hour');
      if (rpm !== null) body.rate_limit_per_minute = rpm;
      if (rph !== null) body.rate_limit_per_hour = rph;
      if (f.ips.value.trim()) body.allowed_ips = splitList(f.ips.value);
    } catch (e) { err.textContent = e.message; err.hidden = false; return; }
    busy(submit, async () => {
      const r = await api('POST', '/auth/admin/services', body);
      if (gen !== S.gen) return;
      showCreated(view, r);
    });
  } },
  field('Service name', f.name, 'Letters, digits, space, _ - . (unique, case-insensitive)'),
  field('Scopes', f.scopes, 'Space or comma separated; trade:* grants everything below trade'),
  field('Environment', f.env), field('Description', f.desc),
  field('Requests per minute', f.rpm, 'Empty: no limit'), field('Requests per hour', f.rph, 'Empty: no limit'),
  field('Allowed IPs / CIDRs', f.ips, 'Space or comma separated; empty: any address'),
  err, h('div', { class: 'actions' }, submit, h('a', { class: 'button', href: '#/services' }, 'Cancel')));
  view.append(h('div', { class: 'page-head' }, h('h1', {}, 'New service')), form);
  f.name.focus();
}

function parseLimit(text, label) {
  const t = text.trim();
  if (!t) return null;
  if (!/^\d+$/.test(t) || Number(t) < 1) throw new Error(`${label}: a whole number of at least 1, or empty for no limit.`);
  return Number(t);
}

function showCreated(view, r) {
  const slot = h('div'), status = h('div');
  view.replaceChildren(h('div', { class: 'page-head' }, h('h1', {}, `Service “${r.service_name}” created`)), slot, status,
    h('div', { class: 'card' }, h('dl', { class: 'fields' },
      h('dt', {}, 'Service id / client id'), h('dd', {}, h('code', {}, r.service_id)),
      h('dt', {}, 'Environment'), h('dd', {}, r.environment),
      h('dt', {}, 'Scopes'), h('dd', { class: 'chips' }, chips(r.scopes))),
    h('div', { class: 'actions' }, h('a', { id: 'open-created', class: 'button', href: `#/services/${enc(r.service_id)}` }, 'Open the service'),
      h('a', { class: 'button', href: '#/services' }, 'Back to services'))));
  const panel = oneTimePanel(slot, r.service_id);
  panel.set('key', { value: r.api_key, id: r.key_id });
  panel.add('secret', { value: r.client_secret, id: r.client_secret_id, note: `OAuth2 client id: ${r.client_id}` });
  writeStatus(status, 'Service created', r);
}

// ---------------------------------------------------------------- service detail
const GRACE_CHOICES = [[0, 'none — old ones stop now'], [3600, '1 hour'], [86400, '24 hours'], [604800, '7 days']];

// A rotated-out key is still in use when it was used in the last 24 h or since its rotation
// (the creation of the next key after it).
function stillInUse(k, all) {
  if (k.status !== 'grace' || !k.last_used_at) return false;
  const used = Date.parse(k.last_used_at), created = Date.parse(k.created_at);
  const later = all.map((o) => Date.parse(o.created_at)).filter((t) => t > created);
  const rotated = later.length ? Math.min(...later) : null;
  return Date.now() - used < 86400e3 || (rotated !== null && used >= rotated);
}

function viewService(view, gen, id) {
  if (!/^srv_[A-Za-z0-9_-]{1,64}$/.test(id)) { go('#/services'); showError(new ApiError(404, 'not_found', `no service id: ${id}`)); return; }
  const head = h('div', { class: 'page-head' }), oneTime = h('div'), status = h('div'), confirmSlot = h('div'), body = h('div');
  const root = h('section', { id: 'service-detail', 'data-service-id': id }, head, oneTime, status, confirmSlot, body);
  view.append(h('p', {}, h('a', { href: '#/services' }, '← Services')), root);
  const panel = oneTimePanel(oneTime, id);
  const grace = h('select', { id: 'rotate-grace', 'aria-label': 'Grace for the old credential' },
    GRACE_CHOICES.map(([s, label]) => h('option', { value: s, selected: s === 604800 }, label)));
  const base = `/auth/admin/services/${enc(id)}`;

  function askConfirm(message, yesLabel, onYes) {
    const yes = h('button', { id: 'confirm-yes', type: 'button', class: 'danger' }, yesLabel);
    yes.addEventListener('click', () => busy(yes, async () => { confirmSlot.replaceChildren(); await onYes(); }));
    confirmSlot.replaceChildren(h('div', { id: 'confirm', class: 'confirm', role: 'alertdialog', 'aria-label': 'Confirm' },
      h('p', {}, message), h('div', { class: 'actions' }, yes, h('button', { id: 'confirm-no', type: 'button', onclick: () => confirmSlot.replaceChildren() }, 'Cancel'))));
    confirmSlot.scrollIntoView({ block: 'nearest' });
    yes.focus();
  }

  async function load() {
    const [svc, graceList] = await Promise.all([
      api('GET', base),
      api('GET', '/auth/admin/keys?status=grace').catch((e) => { if (e.status === 401) throw e; return null; }),
    ]);
    if (gen !== S.gen) return;
    const graceEnds = new Map();
    for (const k of (graceList && graceList.keys) || []) if (k.service_id === svc.service_id) graceEnds.set(k.key_id, k.grace_ends_at);
    render(svc, graceEnds);
  }

  function keyTable(kind, keys, graceEnds) {
    const isKey = kind === 'key';
    const rows = keys.map((k) => {
      const inUse = stillInUse(k, keys);
      const end = graceEnds.get(k.key_id) || (k.status === 'grace' ? k.expires_at : null);
      const canRevoke = isKey && (k.status === 'active' || k.status === 'grace');
      return h('tr', { class: `${kind}-row status-${k.status}${inUse ? ' in-use' : ''}`, 'data-key-id': k.key_id, 'data-status': k.status, 'data-in-use': String(inUse) },
        h('td', {}, h('code', {}, k.key_id)), h('td', {}, h('code', {}, k.prefix + '…')),
        h('td', {}, badge(k.status, `status-${k.status}`), inUse ? badge('still in use', 'badge-in-use') : null),
        timeCell(k.created_at), timeCell(k.expires_at), timeCell(k.last_used_at), timeCell(end),
        h('td', {}, canRevoke ? h('button', { type: 'button', class: 'small danger revoke-key', 'data-key-id': k.key_id, onclick: () =>
          askConfirm(`Revoke ${k.key_id} (${k.prefix}…)? It stops working at once on every sidecar${inUse ? ', and it is still in use' : ''}.`, 'Revoke key', async () => {
            const r = await api('POST', `${base}/keys/${enc(k.key_id)}/revoke`);
            writeStatus(status, `Key ${k.key_id} revoked`, r);
            await load();
          }) }, 'Revoke') : null));
    });
    return h('div', { class: 'table-wrap' }, h('table', { class: 'data keys' },
      h('thead', {}, h('tr', {}, ['Id', 'Prefix', 'Status', 'Created', 'Stops / expires', 'Last used', 'Grace ends', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 8, class: 'empty' }, 'None.')))));
  }

  function rotate(kind, btn) {
    return busy(btn, async () => {
      const r = await api('POST', `${base}/${kind === 'key' ? 'rotate' : 'secret/rotate'}`, { grace_seconds: Number(grace.value) });
      const old = kind === 'key' ? r.old_keys_expire_at : r.old_secrets_expire_at;
      const note = (old ? `Previous ones stop at ${fmtTime(old)} (${ago(old)}).` : 'There was no previous one to end.') + (r.expires_at ? ` This one expires at ${fmtTime(r.expires_at)}.` : '');
      if (kind === 'key') panel.set('key', { value: r.api_key, id: r.key_id, note });
      else panel.set('secret', { value: r.client_secret, id: r.client_secret_id, note });
      writeStatus(status, kind === 'key' ? 'API key rotated' : 'Client secret rotated', r);
      await load();
    });
  }

  function render(svc, graceEnds) {
    head.replaceChildren(h('h1', {}, svc.service_name, ' ', badge(svc.environment, `env-${svc.environment}`), ' ',
      svc.disabled ? badge('disabled', 'status-revoked') : badge('enabled', 'status-active'), svc.is_trusted ? badge('trusted', 'badge-trusted') : null));
    const dl = [['Service id / client id', h('code', {}, svc.service_id)], ['Description', h('span', { class: 'prewrap' }, svc.description || '—')], ['Contact', svc.contact_email || '—'],
      ['Scopes', chips(svc.scopes)], ['Rate limits', `${svc.rate_limit_per_minute ?? '∞'} / min, ${svc.rate_limit_per_hour ?? '∞'} / hour (counted per ${svc.rate_limit_scope})`],
      ['Allowed IPs', svc.allowed_ips.length ? chips(svc.allowed_ips) : 'any address'], ['TLS identities', chips(svc.tls_identities)],
      ['Access token lifetime', `${svc.access_token_lifetime} s`], ['Created', fmtTime(svc.created_at)], ['Updated', `${fmtTime(svc.updated_at)} (${ago(svc.updated_at)})`]];
    const inUse = svc.keys.filter((k) => stillInUse(k, svc.keys)).length + svc.client_secrets.filter((k) => stillInUse(k, svc.client_secrets)).length;

    const rk = h('button', { id: 'rotate-key', type: 'button', class: 'primary' }, 'Rotate API key');
    const rs = h('button', { id: 'rotate-secret', type: 'button' }, 'Rotate client secret');
    rk.addEventListener('click', () => rotate('key', rk));
    rs.addEventListener('click', () => rotate('secret', rs));
    const toggle = svc.disabled
      ? h('button', { id: 'enable-service', type: 'button', onclick: (ev) => busy(ev.currentTarget, async () => {
        const r = await api('PATCH', base, { disabled: false }); writeStatus(status, 'Service enabled', r); await load();
      }) }, 'Enable service')
      : h('button', { id: 'disable-service', type: 'button', class: 'danger', onclick: () =>
        askConfirm(`Disable ${svc.service_name}? Every key and client secret of it stops working at once (the record stays; it can be enabled again).`, 'Disable service', async () => {
          const r = await api('DELETE', base); writeStatus(status, 'Service disabled', r); await load();
        }) }, 'Disable service');

    body.replaceChildren(...[
      h('div', { class: 'card' }, h('dl', { class: 'fields' }, dl.map(([k, v]) => [h('dt', {}, k), h('dd', { class: 'chips' }, v)]))),
      h('div', { class: 'card actions-card' }, h('h2', {}, 'Credentials'),
        h('div', { class: 'toolbar' }, h('label', { for: 'rotate-grace' }, 'Old credential keeps working for'), grace, rk, rs, h('span', { class: 'spacer' }), toggle)),
      svc.disabled ? h('p', { class: 'notice warn' }, 'This service is disabled: none of its keys or client secrets works, whatever the status below says.') : null,
      inUse ? h('p', { class: 'notice warn' }, `${inUse} rotated-out credential(s) are still being used: move those callers to the new key before the grace window ends.`) : null,
      h('h2', {}, 'API keys'), keyTable('key', svc.keys, graceEnds),
      h('h2', {}, 'Client secrets'), keyTable('secret', svc.client_secrets, graceEnds),
      h('p', { class: 'muted small' }, 'A client secret ends by rotating it (grace “none” ends the old one now); the API revokes API keys one by one.'),
      patchForm(svc)].filter(Boolean));
  }

  function patchForm(svc) {
    const f = {
      scopes: h('input', { id: 'patch-scopes', value: svc.scopes.join(' '), autocomplete: 'off' }),
      rpm: h('input', { id: 'patch-rpm', inputmode: 'numeric', value: svc.rate_limit_per_minute ?? '', placeholder: 'no limit' }),
      rph: h('input', { id: 'patch-rph', inputmode: 'numeric', value: svc.rate_limit_per_hour ?? '', placeholder: 'no limit' }),
      ips: h('input', { id: 'patch-ips', value: svc.allowed_ips.join(' '), autocomplete: 'off', placeholder: 'any address' }),
    };
    const err = h('p', { id: 'patch-error', class: 'form-error', role: 'alert', hidden: true });
    const submit = h('button', { id: 'patch-submit', type: 'submit', class: 'primary' }, 'Save changes');
    const field = (label, el, help, wide) => h('div', { class: `field${wide ? ' wide' : ''}` }, h('label', { for: el.id }, label), el, help ? h('small', { class: 'muted' }, help) : null);
    return h('form', { id: 'patch-form', class: 'card form-grid', novalidate: true, onsubmit: (ev) => {
      ev.preventDefault();
      err.hidden = true;
      const patch = {};
      try {
        const scopes = splitList(f.scopes.value), ips = splitList(f.ips.value);
        if (!sameSet(scopes, svc.scopes)) patch.scopes = scopes;
        const rpm = parseLimit(f.rpm.value, 'Requests per minute'), rph = parseLimit(f.rph.value, 'Requests per hour');
        if (rpm !== (svc.rate_limit_per_minute ?? null)) patch.rate_limit_per_minute = rpm;
        if (rph !== (svc.rate_limit_per_hour ?? null)) patch.rate_limit_per_hour = rph;
        if (!sameSet(ips, svc.allowed_ips)) patch.allowed_ips = ips;
        if (!Object.keys(patch).length) throw new Error('Nothing changed.');
      } catch (e) { err.textContent = e.message; err.hidden = false; return; }
      busy(submit, async () => {
        const r = await api('PATCH', base, patch);
        writeStatus(status, `Saved: ${Object.keys(patch).join(', ')}`, r);
        await load();
      });
    } },
    h('h2', { class: 'span' }, 'Change settings'),
    field('Scopes', f.scopes, 'Space or comma separated', true), field('Allowed IPs / CIDRs', f.ips, 'Space or comma separated; empty: any address', true),
    field('Requests per minute', f.rpm, 'Empty: no limit'), field('Requests per hour', f.rph, 'Empty: no limit'),
    err, h('div', { class: 'actions' }, submit));
  }

  return load();
}

// ---------------------------------------------------------------- audit log
const AUDIT_ACTIONS = ['service.create', 'service.bulk_create', 'service.patch', 'service.disable', 'key.rotate', 'key.revoke', 'key.expiry',
  'secret.rotate', 'secret.expiry', 'token.revoke', 'signing_key.rotate', 'auth.failed'];

// datetime-local (the operator's local time) <-> Unix seconds.
const localToUnix = (v) => (v ? Math.floor(new Date(v).getTime() / 1000) : null);
function unixToLocal(s) {
  if (s == null) return '';
  const d = new Date(s * 1000), p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}

function viewAudit(view, gen) {
  const A = S.audit;
  // Verified results are not carried over from an earlier visit: the log may have changed.
  A.chain = null;
  const F = {
    actor: h('input', { id: 'audit-actor', value: A.filters.actor || '', placeholder: 'admin-key, service:…, unauthenticated', autocomplete: 'off' }),
    action: h('input', { id: 'audit-action', value: A.filters.action || '', list: 'audit-actions', placeholder: 'any', autocomplete: 'off' }),
    target: h('input', { id: 'audit-target', value: A.filters.target || '', placeholder: 'srv_…, key_…', autocomplete: 'off' }),
    since: h('input', { id: 'audit-since', type: 'datetime-local', value: unixToLocal(A.filters.since) }),
    until: h('input', { id: 'audit-until', type: 'datetime-local', value: unixToLocal(A.filters.until) }),
    limit: h('select', { id: 'audit-limit' }, [25, 50, 100, 500, 1000].map((n) => h('option', { value: n, selected: n === A.limit }, `${n} per page`))),
  };
  const tbody = h('tbody');
  const prev = h('button', { id: 'audit-prev', type: 'button' }, '← Previous');
  const next = h('button', { id: 'audit-next', type: 'button' }, 'Next →');
  const info = h('span', { class: 'muted' });
  const chain = h('div', { id: 'chain-status', class: 'chain', 'data-state': 'idle', role: 'status' }, 'Not verified yet: the check reads the whole log and recomputes every hash in this page.');
  const expect = h('input', { id: 'expect-head', placeholder: 'optional: a head kept from before, SEQ:HASH', autocomplete: 'off', spellcheck: 'false' });
  const verify = h('button', { id: 'verify-chain', type: 'button', class: 'primary' }, 'Verify chain');
  let seq = 0;
  const field = (label, el) => h('div', { class: 'field' }, h('label', { for: el.id }, label), el);
  const apply = () => {
    A.filters = { actor: F.actor.value.trim() || null, action: F.action.value.trim() || null, target: F.target.value.trim() || null,
      since: localToUnix(F.since.value), until: localToUnix(F.until.value) };
    A.limit = Number(F.limit.value); A.after = 0; A.stack = [];
    load().catch(showError);
  };
  prev.addEventListener('click', () => { A.after = A.stack.length ? A.stack.pop() : 0; load().catch(showError); });
  next.addEventListener('click', () => { if (A.next == null) return; A.stack.push(A.after); A.after = A.next; load().catch(showError); });
  verify.addEventListener('click', () => busy(verify, () => verifyChain(chain, expect.value.trim(), gen, () => load().catch(showError))));

  view.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Audit log')),
    h('form', { id: 'audit-filters', class: 'card filters', novalidate: true, onsubmit: (ev) => { ev.preventDefault(); apply(); } },
      field('Actor', F.actor), field('Action', F.action), field('Target', F.target),
      field('Since (your local time)', F.since), field('Until (your local time)', F.until), field('Page size', F.limit),
      h('datalist', { id: 'audit-actions' }, AUDIT_ACTIONS.map((a) => h('option', { value: a }))),
      h('div', { class: 'actions' }, h('button', { id: 'audit-apply', type: 'submit', class: 'primary' }, 'Apply filters'),
        h('button', { id: 'audit-reset', type: 'button', onclick: () => { for (const k of ['actor', 'action', 'target', 'since', 'until']) F[k].value = ''; apply(); } }, 'Clear'))),
    h('div', { class: 'card' }, h('div', { class: 'toolbar' }, verify, expect), chain),
    h('div', { class: 'table-wrap' }, h('table', { class: 'data audit' },
      h('thead', {}, h('tr', {}, ['Seq', 'Time', 'Actor', 'Action', 'Target', 'Source', 'Change', 'Hash'].map((t) => h('th', {}, t)))), tbody)),
    h('div', { class: 'pager' }, prev, info, next));
  showChain(chain, A.chain);

  async function load() {
    const my = ++seq;
    const q = new URLSearchParams({ limit: String(A.limit) });
    for (const [k, v] of Object.entries(A.filters)) if (v != null && v !== '') q.set(k, String(v));
    if (A.after) q.set('after', String(A.after));
    const page = await api('GET', `/auth/admin/audit?${q}`);
    if (my !== seq || gen !== S.gen) return;
    A.next = page.next_after ?? null;
    const broken = A.chain && A.chain.state === 'broken' ? A.chain.seq : null;
    const rows = (page.entries || []).map((e) => {
      const change = (() => { try { return JSON.stringify(e.change); } catch (_) { return String(e.change); } })();
      return h('tr', { class: `audit-row${e.seq === broken ? ' chain-broken' : ''}${e.action === 'auth.failed' ? ' failed' : ''}`, 'data-seq': e.seq, 'data-action': e.action },
        h('td', { class: 'num' }, String(e.seq)), timeCell(e.at), h('td', {}, h('code', {}, e.actor)), h('td', {}, badge(e.action, 'action')),
        h('td', {}, e.target ? h('code', {}, e.target) : '—'), h('td', {}, e.source_ip || '—'),
        h('td', { class: 'change' }, change.length <= 120 ? h('code', {}, change)
          : h('details', {}, h('summary', {}, h('code', {}, change.slice(0, 100) + '…')), h('pre', {}, JSON.stringify(e.change, null, 2)))),
        h('td', {}, h('code', { title: `${e.hash}\nprev ${e.prev_hash}` }, String(e.hash).slice(0, 12) + '…')));
    });
    tbody.replaceChildren(...(rows.length ? rows : [h('tr', {}, h('td', { colspan: 8, class: 'empty' }, 'No entry matches.'))]));
    prev.disabled = A.stack.length === 0 && !A.after;
    next.disabled = A.next == null;
    info.textContent = rows.length ? `seq ${page.entries[0].seq} – ${page.entries[page.entries.length - 1].seq}` : '';
  }
  return load();
}

// Reads the whole log from seq 1 (1000 a page) and checks every link and hash.
async function verifyChain(el, expectHead, gen, reload) {
  const A = S.audit;
  let expSeq = null, expHash = null, expFound = false;
  if (expectHead) {
    const m = /^(\d+):([0-9a-fA-F]{64})$/.exec(expectHead);
    if (!m) { showChain(el, { state: 'error', message: 'The expected head must be SEQ:HASH (as printed by permiso audit verify or by this page).' }); return; }
    expSeq = Number(m[1]); expHash = m[2].toLowerCase();
  }
  const v = makeVerifier();
  let after = 0, result = null;
  showChain(el, { state: 'running', message: 'Verifying…' });
  try {
    for (;;) {
      // Left the page or signed out: stop paging.
      if (gen !== S.gen || !S.key) return;
      const page = await api('GET', `/auth/admin/audit?limit=1000${after ? `&after=${after}` : ''}`);
      for (const e of page.entries || []) {
        const br = v.push(e);
        if (br) { result = { state: 'broken', ...br }; break; }
        if (e.seq === expSeq) { expFound = true; if (String(e.hash).toLowerCase() !== expHash) { result = { state: 'broken', seq: e.seq, what: 'differs from the head kept before', expected: expHash, got: String(e.hash).toLowerCase() }; break; } }
      }
      if (result || page.next_after == null) break;
      after = page.next_after;
      if (gen === S.gen) showChain(el, { state: 'running', message: `Verifying… ${v.head().entries} entries so far` });
      await new Promise((r) => setTimeout(r, 0));
    }
    if (!result) {
      const head = v.head();
      result = expSeq !== null && !expFound
        ? { state: 'broken', seq: expSeq, what: 'the kept head is not in the log', expected: expHash, got: `a log ending at seq ${head.seq}` }
        : { state: 'ok', ...head };
    }
  } catch (e) {
    result = { state: 'error', message: `Could not verify: ${e instanceof ApiError ? `${e.code}: ${e.description}` : e.message}` };
    if (e instanceof ApiError) showError(e);
  }
  A.chain = result;
  if (gen === S.gen) { showChain(el, result); reload(); }
}

function showChain(el, r) {
  if (!r) return;
  el.dataset.state = r.state;
  if (r.state === 'ok') {
    const head = h('code', { id: 'chain-head' }, `${r.seq}:${r.hash}`), hint = h('span', { class: 'copy-hint', hidden: true });
    el.replaceChildren(h('strong', {}, `✓ Chain verified: ${r.entries} entries, head seq ${r.seq} hash ${r.hash}`),
      h('p', { class: 'muted small' }, 'Keep the head somewhere else and paste it above next time: a rewrite of the whole database would not be caught otherwise. '),
      h('div', { class: 'secret-value' }, head, copyButton('copy-head', head, hint)), hint);
  } else if (r.state === 'broken') {
    el.replaceChildren(h('strong', {}, `✗ Chain BROKEN at seq ${r.seq} (expected ${r.expected}, got ${r.got})`),
      h('p', {}, `Entry ${r.seq}: ${r.what}. Entries from it on cannot be trusted.`),
      h('button', { id: 'show-broken', type: 'button', class: 'small', onclick: () => {
        const A = S.audit; A.filters = {}; A.stack = []; A.after = Math.max(0, r.seq - 1); route();
      } }, `Show entry ${r.seq}`));
  } else {
    el.replaceChildren(r.message);
  }
}

// ---------------------------------------------------------------- fleet
function viewFleet(view, gen, version) {
  const summary = h('p', { id: 'fleet-summary' }), prop = h('div'), body = h('div');
  const refresh = h('button', { id: 'fleet-refresh', type: 'button' }, 'Refresh');
  const auto = h('input', { id: 'fleet-auto', type: 'checkbox' });
  const vIn = h('input', { id: 'change-version', inputmode: 'numeric', value: version || '', placeholder: 'version', class: 'narrow' });
  const vRes = h('span', { id: 'change-result', class: 'muted' });
  const check = h('button', { id: 'change-check', type: 'button' }, 'Check a version');
  check.addEventListener('click', () => busy(check, async () => {
    if (!/^\d+$/.test(vIn.value.trim())) { vRes.textContent = 'A version is a whole number.'; return; }
    const c = await api('GET', `/auth/admin/changes/${vIn.value.trim()}`);
    vRes.textContent = `version ${c.version}: ${c.complete ? 'on every live sidecar' : 'not everywhere yet'} — ${c.summary}` + (c.pending.length ? `; pending: ${c.pending.join(', ')}` : '');
  }));
  refresh.addEventListener('click', () => busy(refresh, load));
  view.append(h('div', { class: 'page-head' }, h('h1', {}, 'Fleet'),
    h('div', { class: 'toolbar' }, h('label', { class: 'check' }, auto, ' auto-refresh (5 s)'), refresh)),
  summary, prop, body, h('div', { class: 'card toolbar' }, vIn, check, vRes));

  async function load() {
    const list = await api('GET', '/auth/admin/sidecars');
    if (gen !== S.gen) return;
    summary.textContent = `Admin plane at version ${list.current_version}; ${list.live} live, ${list.stale} stale sidecar(s).`;
    const cars = list.sidecars || [];
    if (!cars.length) {
      prop.replaceChildren();
      body.replaceChildren(h('p', { id: 'fleet-empty', class: 'card empty' }, 'No sidecar has reported yet. A sidecar is listed after its first sync with the admin plane.'));
      return;
    }
    let c = null;
    try { c = await api('GET', `/auth/admin/changes/${list.current_version}`); } catch (e) { if (e.status === 401) return; showError(e); }
    if (gen !== S.gen) return;
    prop.replaceChildren(c ? h('div', { id: 'propagation', class: `notice ${c.complete ? 'ok' : 'warn'}`, 'data-complete': String(c.complete) },
      h('strong', {}, c.complete ? `✓ The latest change (version ${c.version}) reached every live sidecar` : `… The latest change (version ${c.version}) has not reached every live sidecar yet`),
      ` — ${c.summary}.`, c.pending.length ? h('div', {}, 'Pending: ', chips(c.pending)) : null, c.stale.length ? h('div', {}, 'Stale (not counted): ', chips(c.stale)) : null) : '');
    body.replaceChildren(h('div', { class: 'table-wrap' }, h('table', { class: 'data' },
      h('thead', {}, h('tr', {}, ['Instance', 'Status', 'Env', 'Upstream', 'Build', 'Mode', 'Version', 'Lag', 'Last seen', 'Sync key', 'Routes'].map((t) => h('th', {}, t)))),
      h('tbody', {}, cars.map((s) => h('tr', { class: `sidecar-row ${s.status}${s.lag_versions ? ' lagging' : ''}`, 'data-instance-id': s.instance_id, 'data-status': s.status },
        h('td', {}, h('code', {}, s.instance_id)), h('td', {}, badge(s.status, s.status === 'live' ? 'status-active' : 'status-expired')),
        h('td', {}, s.environment), h('td', {}, h('code', {}, s.upstream)), h('td', {}, s.build), h('td', {}, s.mode),
        h('td', { class: 'num' }, s.version_applied ?? '—'), h('td', { class: 'num' }, s.lag_versions ?? '—'),
        h('td', { class: 'time' }, `${s.seconds_since_seen}s ago`, h('span', { class: 'muted rel' }, fmtTime(s.last_seen))),
        h('td', {}, h('code', {}, s.sync_key_id)),
        h('td', {}, h('details', {}, h('summary', {}, `${s.routes.length} route(s)${s.routes_truncated ? ' (truncated)' : ''}`),
          h('ul', { class: 'routes' }, s.routes.map((r) => h('li', {}, h('code', {}, `${(r.methods || []).join(',') || 'ANY'} ${r.prefix}`), ' ', chips(r.scopes),
            r.trusted ? badge('trusted', 'badge-trusted') : null, r.shadow ? badge('shadow', 'status-grace') : null)))))))))));
  }
  const tick = () => setTimeout(() => { if (gen !== S.gen) return; if (auto.checked) load().catch(showError).finally(tick); else tick(); }, 5000);
  tick();
  if (version) check.click();
  return load();
}

// ---------------------------------------------------------------- start
function start() {
  try { S.key = sessionStorage.getItem(KEY_SLOT); } catch (_) { S.key = null; }
  $('#error-dismiss').addEventListener('click', hideError);
  $('#logout').addEventListener('click', () => { clearKey(); S.loginMessage = 'Logged out: the admin key is gone from this tab.'; go('#/login'); });
  // A click on the current page's link reloads it (no hashchange fires).
  for (const a of document.querySelectorAll('#nav a')) a.addEventListener('click', (ev) => { if (a.getAttribute('href') === location.hash) { ev.preventDefault(); route(); } });
  window.addEventListener('hashchange', route);
  // Leaving the page (or entering the back/forward cache) drops any secret still shown.
  window.addEventListener('pagehide', () => { for (const el of document.querySelectorAll('#one-time')) el.remove(); });
  route();
}

if (typeof document !== 'undefined') {
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start); else start();
}
