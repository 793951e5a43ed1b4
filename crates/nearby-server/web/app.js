// The nearby browser client: plain DOM, one WebSocket; the street map is
// Leaflet (bundled under /assets/vendor, loaded as window.L), and the page
// works without it (the radar view). Wire contract: docs/protocol.md.

import { placeLabels } from './labels.js';

const EARTH_RADIUS_M = 6371008.8; // protocol.md: mean Earth radius
const MIN_SEND_GAP_MS = 1000;     // well under the 5 frames/s limit
const RESEND_MS = 10000;          // until the server suggests an interval (older servers)
// Reconnecting as docs/protocol.md asks: the server's reconnect_after_ms,
// then full jitter over 0.5 s doubling to 20 s.
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 20000;
const DEMO_CENTRE = { lat: 37.5665, lon: 126.978 };
const SESSION_KEY = 'nearby.session';
// Why a friend left the list: [one friend, several].
const LEFT_REASONS = {
  out_of_range: ['is out of range now', 'are out of range now'],
  inactive: ['stopped updating', 'stopped updating'],
  unshared: ['stopped sharing with you', 'stopped sharing with you'],
  unfriended: ['is no longer your friend', 'are no longer your friends'],
};

const $ = (sel) => document.querySelector(sel);

const state = {
  session: null,        // {token, user_id, username, expires_at}
  friends: new Map(),   // id -> {id, username, status, sharing}
  nearby: new Map(),    // id -> {id, distance_m, bearing_deg, updated_at}
  me: null,             // {lat, lon, source}
  ws: null,
  live: false,
  attempt: 0,           // reconnect attempts since the last good connection
  reconnectAfter: 0,    // ms the server asked to wait (going_away), used once
  retryAt: 0,
  retryTimer: null,
  lastWsError: null,
  sendTimer: null,
  lastSent: 0,
  geoWatch: null,
  lastPollError: null,
  discoverable: { enabled: false, until: null },
  strangers: new Map(), // alias -> {id, bucket_km, bearing_deg}
  web: { map: null, radius_m: 8047, demo: false }, // GET /v1/web-config
  view: 'radar',        // 'map' (streets) or 'radar'
  tiles: 'none',        // the street map's tiles: none, loading, ok, failed
  selected: null,       // the friend whose details are open
  placing: false,       // the next click on the map puts you there
};

// ---------- small DOM helpers ----------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  el.append(...children);
  return el;
}

function s(tag, attrs = {}, text) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// ---------- messages ----------

// Errors stay until dismissed (×); a `key` replaces the earlier message of
// that key, and clearNotes(key) removes it once the problem is over. The
// same text is never shown twice: the new one replaces the old.
// With `card`, the message goes at the top of that card (where the person
// is looking; the top of the page may be scrolled away on a phone).
function notify(text, kind = 'error', ttlMs = kind === 'error' ? 0 : 5000, key = undefined, card = undefined) {
  const box = card ? cardNotes(card) : $('#messages');
  if (key) clearNotes(key);
  for (const el of box.querySelectorAll('.msg')) if (el.firstElementChild?.textContent === text) el.remove();
  const msg = h('div', { class: `msg ${kind}`, role: kind === 'error' ? 'alert' : undefined, 'data-key': key },
    h('span', {}, text),
    h('button', { type: 'button', class: 'link', 'aria-label': 'Dismiss', onclick: () => msg.remove() }, '×'));
  box.append(msg);
  while (box.children.length > 5) box.firstElementChild.remove();
  if (ttlMs) setTimeout(() => msg.remove(), ttlMs);
}

function clearNotes(key) {
  for (const el of document.querySelectorAll(key ? `.msg[data-key="${key}"]` : '#messages .msg, .card-notes .msg')) el.remove();
}

// The message area at the top of a card, made on first use.
function cardNotes(card) {
  let box = card.querySelector(':scope > .card-notes');
  if (!box) {
    box = h('div', { class: 'card-notes' });
    card.querySelector(':scope > h2').after(box);
  }
  return box;
}
const CARD = {
  friends: () => $('#friends').closest('.card'),
  nearby: () => $('#nearby').closest('.card'),
  privacy: () => $('#privacy'),
};

// A failure as a sentence for people: ours for the server's codes a person
// meets, else the server's message as a sentence; never a code.
const SENTENCES = {
  bad_credentials: 'Wrong username or password.',
  username_taken: 'That username is taken: choose another.',
  unknown_user: 'Nobody has that username: usernames are exact, check the spelling.',
  invalid_username: 'Use 3 to 32 letters, digits, or _ - . characters.',
  invalid_password: 'Use 8 to 128 characters.',
  too_many_attempts: 'Too many tries: wait a little, then try again.',
  too_many_signups: 'Too many sign-ups from this network: try again later.',
  too_many_changes: 'Too many changes in a short time: wait a moment, then try again.',
  not_friends: 'You are not friends (any more): the list is refreshed.',
};
function describe(err) {
  const known = SENTENCES[err?.code];
  if (known) return known;
  const text = String(err?.message ?? err).trim();
  const sentence = text.charAt(0).toUpperCase() + text.slice(1);
  return /[.!?]$/.test(sentence) ? sentence : `${sentence}.`;
}

// Shows a failure, unless it already ended the session (which says so
// itself). An unreachable server is one message, cleared when the
// connection is live again.
function report(err, prefix = '') {
  if (err?.handled) return;
  notify(prefix + describe(err), 'error', 0, err?.code === 'network' ? 'conn' : undefined);
}

// Runs an async UI action, reporting any failure.
const guard = (fn) => async (...args) => {
  try { await fn(...args); } catch (err) { report(err); }
};

// Runs an action of a card: its failure is said in that card, where the
// person is looking (the top of the page may be scrolled away on a
// phone), and cleared by the card's next success. An unreachable server
// is said once, page-wide.
const guardIn = (card, fn) => async (...args) => {
  try {
    await fn(...args);
    for (const el of card.querySelectorAll(':scope > .card-notes .msg.error')) el.remove();
  } catch (err) {
    if (err?.handled) return;
    if (err?.code === 'network') { report(err); return; }
    notify(describe(err), 'error', 0, 'action', card);
  }
};

// A problem with what was typed, said under its form; `bad` fields are
// marked invalid, the rest of `fields` valid. No text clears it.
function formProblem(noteId, text, bad, fields) {
  const note = $(`#${noteId}`);
  note.textContent = text ?? '';
  note.hidden = !text;
  for (const f of fields) $(`#${f}`).setAttribute('aria-invalid', String(Boolean(text) && bad.includes(f)));
  if (text && bad.length) $(`#${bad[0]}`).focus();
}

// ---------- REST ----------

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const token = state.session?.token;
  if (token) headers.Authorization = `Bearer ${token}`;
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, 'network', 'Cannot reach the server. Check your connection; the page keeps trying.');
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON: reported below */ }
  if (!res.ok) {
    const err = new ApiError(res.status, data?.code ?? `http_${res.status}`,
      data?.message ?? (text || res.statusText || `HTTP ${res.status}`));
    // A refused token means the session is over, whatever the call was.
    if (res.status === 401 && token && token === state.session?.token && err.code === 'unauthorized') {
      endSession('Your session has ended. Please log in again.');
      err.handled = true;
    }
    throw err;
  }
  return data;
}

// ---------- session ----------

function loadSession() {
  try {
    const saved = JSON.parse(localStorage.getItem(SESSION_KEY) || 'null');
    if (saved?.token && (!saved.expires_at || saved.expires_at > Date.now())) return saved;
  } catch { /* corrupt entry: start over */ }
  localStorage.removeItem(SESSION_KEY);
  return null;
}

function credentials() {
  return { username: $('#username').value.trim(), password: $('#password').value };
}

// Checks the login fields where they are, each problem under its own field
// (every one, not the first); focuses the first. True when all are fine.
function checkAuthFields(signingUp) {
  const { username, password } = credentials();
  const problems = {};
  if (!username) problems.username = 'Enter your username.';
  else if (signingUp && !/^[A-Za-z0-9_.-]{3,32}$/.test(username.normalize('NFKC'))) {
    problems.username = SENTENCES.invalid_username;
  }
  if (!password) problems.password = 'Enter your password.';
  else if (signingUp && (password.length < 8 || password.length > 128)) problems.password = SENTENCES.invalid_password;
  for (const field of ['username', 'password']) {
    const note = $(`#${field}-problem`);
    note.textContent = problems[field] ?? '';
    note.hidden = !problems[field];
    $(`#${field}`).setAttribute('aria-invalid', String(Boolean(problems[field])));
  }
  const first = Object.keys(problems)[0];
  if (first) $(`#${first}`).focus();
  return !first;
}

async function logIn(creds) {
  const res = await api('POST', '/v1/sessions', creds);
  startSession({ token: res.token, user_id: res.user_id, expires_at: res.expires_at, username: creds.username });
}

function startSession(session) {
  state.session = session;
  localStorage.setItem(SESSION_KEY, JSON.stringify(session));
  $('#password').value = '';
  clearNotes();
  $('#auth-view').hidden = true;
  $('#app-view').hidden = false;
  $('#logout').hidden = false;
  $('#conn-status').hidden = false; // only a signed-in page has a connection to speak of
  $('#whoami').replaceChildren(h('span', { class: 'who-prefix' }, 'signed in as '), session.username);
  state.attempt = 0;
  $('#lat').focus(); // where to start: your location
  connect();
  // Read once here and on every (re)connect's snapshot; changes in
  // between are pushed over the WebSocket (friend_update, friend_removed).
  refreshFriends().catch((err) => report(err));
  renderAll();
}

// Leaves the app view; `reason` is shown when the server ended the session.
function endSession(reason) {
  if (!state.session) return;
  state.session = null;
  localStorage.removeItem(SESSION_KEY);
  clearTimeout(state.retryTimer);
  clearTimeout(state.sendTimer);
  stopGeo();
  const ws = state.ws;
  state.ws = null;
  state.live = false;
  if (ws) ws.close(1000, 'logged out');
  state.friends.clear();
  state.nearby.clear();
  clearTimeout(state.shareTimer);
  state.ghost = null;
  renderGhost();
  state.discoverable = { enabled: false, until: null };
  state.strangers.clear();
  renderStrangers();
  state.me = null;
  state.selected = null;
  clearStreetMap();
  $('#app-view').hidden = true;
  $('#auth-view').hidden = false;
  $('#logout').hidden = true;
  $('#whoami').textContent = '';
  setConn('idle', 'not connected');
  $('#conn-status').hidden = true;
  clearNotes();
  if (reason) notify(reason);
}

// ---------- friends ----------

// Bumped by every pushed friend change: a list read while one arrived may
// predate it, and would overwrite the pushed row with the older one.
let friendPushes = 0;

async function refreshFriends() {
  let res;
  for (let tries = 0; ; tries++) {
    if (!state.session) return;
    const seen = friendPushes;
    res = await api('GET', '/v1/friends');
    if (seen === friendPushes || tries === 4) break;
  }
  if (!state.session) return;
  applyFriendList(res.friends);
}

function applyFriendList(rows) {
  // The server withholds the name of someone you asked until they accept;
  // this page remembers the names it looked up itself.
  state.friends = new Map(rows.map((f) =>
    [f.id, { ...f, username: f.username ?? lookedUp.get(f.id) ?? `user #${f.id}` }]));
  renderFriends();
  renderNearby();
}

async function pollFriends() {
  try {
    await refreshFriends();
    state.lastPollError = null;
    clearNotes('poll');
  } catch (err) {
    // Report a failing refresh once, not on every snapshot.
    if (state.lastPollError !== err.code && !err.handled) notify(`Could not refresh friends: ${describe(err)}`, 'error', 0, 'poll');
    state.lastPollError = err.code;
  }
}

let refreshSoon = null;
function refreshFriendsSoon() {
  if (refreshSoon) return;
  refreshSoon = setTimeout(() => { refreshSoon = null; pollFriends(); }, 200);
}

// Names of friends just removed: a friend_left may follow the removal.
const lastNames = new Map();
const nameOf = (id) => state.friends.get(id)?.username ?? lookedUp.get(id) ?? lastNames.get(id) ?? `user #${id}`;

// id -> username of the users this page looked up by name.
const lookedUp = new Map();

async function requestFriend(event) {
  event.preventDefault();
  const name = $('#friend-name').value.trim();
  const say = (text) => formProblem('friend-problem', text, ['friend-name'], ['friend-name']);
  if (!name) { say('Type the exact username of the person to add.'); return; }
  let user;
  let res;
  try {
    user = await api('GET', `/v1/users/by-name/${encodeURIComponent(name)}`);
    if (user.id === state.session.user_id) { say('That is you: type a friend\'s username.'); return; }
    lookedUp.set(user.id, user.username);
    res = await api('PUT', `/v1/friends/${encodeURIComponent(user.id)}`);
  } catch (err) {
    if (err.status === 404 && err.code !== 'not_found') { say(`Nobody is called "${name}": usernames are exact, check the spelling.`); return; }
    if (err.status === 400 || err.status === 409) { say(describe(err)); return; }
    throw err;
  }
  say(null);
  if (state.me) clearNotes('welcome'); // both things it suggested are done
  $('#friend-name').value = '';
  notify(res.status === 'friends' ? `You and ${user.username} are now friends.` : `Friend request sent to ${user.username}.`, 'info', 5000, undefined, CARD.friends());
  await refreshFriends();
}

async function friendAction(event) {
  const button = event.target.closest('[data-action]');
  const li = event.target.closest('li[data-id]');
  if (!button || !li) return;
  const id = li.dataset.id;
  const path = `/v1/friends/${encodeURIComponent(id)}`;
  const action = button.dataset.action;
  const name = li.dataset.username;
  if (action === 'accept') await api('PUT', path);
  else if (action === 'remove') {
    // Ending a friendship is not undone by a click: ask first.
    if (li.dataset.status === 'friends' && !window.confirm(`Remove ${name} from your friends? You stop seeing each other; to be friends again, one of you asks again.`)) return;
    removedByMe.add(id);
    await api('DELETE', path);
  } else if (action === 'sharing') {
    try {
      await api('PUT', `${path}/sharing`, { enabled: button.checked });
    } catch (err) {
      button.checked = !button.checked;
      throw err;
    }
    notify(button.checked ? `${name} can see your distance again.` : `You no longer share your location with ${name}.`, 'info', 5000, `sharing-${li.dataset.id}`, CARD.friends());
  } else if (action === 'precision' || action === 'share-for') {
    // The terms are sent whole: an omitted `until` means "for good".
    const row = state.friends.get(id);
    const body = { enabled: true };
    if (action === 'precision') {
      body.precision = button.value;
      if (row?.sharing_until > Date.now() + 1000) body.until = row.sharing_until;
    } else {
      if (button.value === 'keep') return;
      if (button.value) body.until = Date.now() + Number(button.value);
    }
    try {
      await api('PUT', `${path}/sharing`, body);
    } catch (err) {
      renderFriends();
      throw err;
    }
  } else return;
  await refreshFriends();
}

// ---------- ghost mode ----------

async function loadGhost() {
  if (!state.session) return;
  state.ghost = await api('GET', '/v1/me/ghost');
  renderGhost();
}

async function setGhost() {
  const on = $('#ghost').checked;
  try {
    if (on) {
      const ms = Number($('#ghost-for').value);
      state.ghost = await api('PUT', '/v1/me/ghost', { until: ms ? Date.now() + ms : null });
    } else {
      await api('DELETE', '/v1/me/ghost');
      state.ghost = { ghost: false, until: null };
      if (state.live) sendLocation(); // friends see you again from your next position: now
    }
  } finally {
    renderGhost();
  }
}

function renderGhost() {
  const g = state.ghost ?? { ghost: false, until: null };
  $('#ghost').checked = g.ghost;
  $('#privacy').dataset.ghost = String(g.ghost);
  $('#ghost-info').textContent = g.ghost
    ? `Hidden from every friend ${g.until ? `until ${fmtClock(g.until)}` : 'until you turn it off'}; they see you as gone quiet. Your history still records.`
    : 'Friends you share with see your distance.';
  renderLocationInfo();
  clearTimeout(state.ghostTimer);
  if (g.ghost && g.until) state.ghostTimer = setTimeout(() => loadGhost().catch((err) => report(err)), Math.max(0, g.until - Date.now()) + 500);
}

// ---------- strangers nearby ----------

const LOOKING_MS = 12000; // a little over the server's default stranger heartbeat
const WINDS = ['north', 'north-east', 'east', 'south-east', 'south', 'south-west', 'west', 'north-west'];

// Opt in or out: over the socket when live (applied at once), else REST.
async function setDiscoverable() {
  const enabled = $('#discoverable').checked;
  if (state.live && state.ws) {
    state.ws.send(JSON.stringify({ type: 'discoverable', enabled }));
    return; // the server answers with a `discoverable` frame
  }
  try {
    state.discoverable = enabled
      ? await api('PUT', '/v1/me/discoverable', {})
      : (await api('DELETE', '/v1/me/discoverable'), { enabled: false, until: null });
  } finally {
    renderStrangers();
  }
}

function renderStrangers() {
  const d = state.discoverable;
  $('#discoverable').checked = d.enabled;
  $('#strangers-card').dataset.discoverable = String(d.enabled);
  const rows = [...state.strangers.values()].sort((a, b) => a.bucket_km[0] - b.bucket_km[0] || a.id.localeCompare(b.id));
  $('#strangers').replaceChildren(...rows.map((st) => h('li', { 'data-id': st.id, 'data-bucket': st.bucket_km.join('-') },
    h('span', { class: 'avatar stranger', 'aria-hidden': 'true' }, '?'),
    h('span', { class: 'name' }, 'Someone'),
    h('span', { class: 'distance' }, `${st.bucket_km[0]}–${st.bucket_km[1]} km ${st.bearing_deg == null ? 'in your area' : `to the ${WINDS[Math.round(st.bearing_deg / 45) % 8]}`}`))));
  $('#strangers-info').textContent = !d.enabled
    ? 'Off: no stranger sees you, and you see none.'
    : `${rows.length ? '' : Date.now() - (state.discoverableSince ?? 0) < LOOKING_MS
      ? 'Looking for people nearby who opted in (they show up within seconds). '
      : 'Nobody else discoverable around you right now. '}Discoverable ${d.until ? `until ${fmtClock(d.until)}` : 'until you turn it off'}: strangers see only which ~5 km area you are in, never your position or name.`;
}

// ---------- history and account ----------

async function exportHistory() {
  const from = Date.now() - 366 * 86400000;
  const res = await fetch(`/v1/me/history?format=geojson&from=${from}`, {
    headers: { Authorization: `Bearer ${state.session.token}` },
  });
  if (!res.ok) throw new ApiError(res.status, `http_${res.status}`, `Could not export your history (HTTP ${res.status}).`);
  const blob = await res.blob();
  const a = h('a', { href: URL.createObjectURL(blob), download: `nearby-history-${state.session.username}.geojson` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

async function deleteHistory() {
  if (!window.confirm('Delete all of your location history? This cannot be undone.')) return;
  const res = await api('DELETE', '/v1/me/history');
  notify(`Deleted ${res.deleted} point(s) of your history.`, 'info', 5000, undefined, CARD.privacy());
}

async function deleteAccount(event) {
  event.preventDefault();
  const password = $('#account-delete-password').value;
  if (!password) throw new Error('Type your password to confirm.');
  await api('DELETE', '/v1/me', { username: state.session.username, password });
  $('#account-delete-password').value = '';
  if (!state.session) return; // the socket's close said so first
  endSession();
  notify('Your account was deleted.', 'info', 8000);
}

// ---------- location ----------

function validLatLon(lat, lon) {
  return Number.isFinite(lat) && Number.isFinite(lon) && Math.abs(lat) <= 90 && Math.abs(lon) <= 180;
}

function setMyLocation(lat, lon, source) {
  if (!validLatLon(lat, lon)) throw new Error('Latitude must be in [-90, 90] and longitude in [-180, 180].');
  if (state.friends.size) clearNotes('welcome'); // both things it suggested are done
  state.me = { lat, lon, source };
  $('#lat').value = lat.toFixed(6);
  $('#lon').value = lon.toFixed(6);
  queueSend();
  renderMap();
  renderLocationInfo();
}

// Positions this page did not produce: the server's copy (snapshot) and
// moves reported by another of the user's devices. Shown, never re-sent.
const REMOTE_SOURCES = new Set(['server', 'elsewhere']);

function adoptRemoteLocation(loc, source) {
  if (!loc || !validLatLon(loc.lat, loc.lon)) return;
  if (state.me && !REMOTE_SOURCES.has(state.me.source) && source === 'server') return; // this page's own is newer
  state.me = { lat: loc.lat, lon: loc.lon, source };
  $('#lat').value = loc.lat.toFixed(6);
  $('#lon').value = loc.lon.toFixed(6);
  renderMap();
  renderLocationInfo();
}

// The server suggests how often to report (snapshot `interval_ms`, then
// `interval` frames): fast while a friend who can see you is near, slow
// otherwise. A position you set by hand goes at once (at most once a
// second); the device's own moves and the refresh follow the interval.
const interval = () => state.intervalMs ?? RESEND_MS;

function queueSend() {
  clearTimeout(state.sendTimer);
  const gap = state.me?.source === 'device' ? interval() : MIN_SEND_GAP_MS;
  const wait = Math.max(0, state.lastSent + gap - Date.now());
  state.sendTimer = setTimeout(sendLocation, wait);
}

function sendLocation() {
  clearTimeout(state.sendTimer);
  state.sendTimer = null;
  const ws = state.ws;
  if (!state.me || !state.live || !ws || ws.readyState !== WebSocket.OPEN) return; // sent on (re)connect
  if (REMOTE_SOURCES.has(state.me.source)) return; // the device that reported it keeps it fresh
  ws.send(JSON.stringify({ type: 'location', lat: state.me.lat, lon: state.me.lon }));
  state.lastSent = Date.now();
  state.sendTimer = setTimeout(sendLocation, interval());
  renderLocationInfo();
}

function stopGeo() {
  if (state.geoWatch !== null) navigator.geolocation.clearWatch(state.geoWatch);
  state.geoWatch = null;
  const btn = $('#use-geo');
  btn.setAttribute('aria-pressed', 'false');
  btn.textContent = 'Use my location';
}

function toggleGeo() {
  if (state.geoWatch !== null) { stopGeo(); return; }
  if (!('geolocation' in navigator)) throw new Error('This browser has no geolocation.');
  if (!window.isSecureContext) throw new Error('Geolocation needs HTTPS (or localhost); set a location by hand instead.');
  state.geoWatch = navigator.geolocation.watchPosition(
    (pos) => { clearNotes('geo'); setMyLocation(pos.coords.latitude, pos.coords.longitude, 'device'); },
    (err) => {
      // Denied is final; unavailable or slow may pass, so keep watching.
      if (err.code === err.PERMISSION_DENIED) stopGeo();
      const what = { 1: 'permission denied', 2: 'position unavailable', 3: 'timed out' }[err.code];
      notify(`Location from this device: ${what ?? 'failed'}${err.message ? ` (${err.message})` : ''}.`, 'error', 0, 'geo');
    },
    { enableHighAccuracy: true, maximumAge: 5000, timeout: 20000 });
  const btn = $('#use-geo');
  btn.setAttribute('aria-pressed', 'true');
  btn.textContent = 'Stop following';
}

function setFromInputs(event) {
  event.preventDefault();
  const lat = $('#lat').valueAsNumber;
  const lon = $('#lon').valueAsNumber;
  // Each field's problem, both at once, under the form.
  const problems = [];
  const bad = [];
  if (!Number.isFinite(lat)) { problems.push('Enter a latitude.'); bad.push('lat'); }
  else if (Math.abs(lat) > 90) { problems.push('Latitude goes from -90 to 90.'); bad.push('lat'); }
  if (!Number.isFinite(lon)) { problems.push('Enter a longitude.'); bad.push('lon'); }
  else if (Math.abs(lon) > 180) { problems.push('Longitude goes from -180 to 180.'); bad.push('lon'); }
  formProblem('location-problem', problems.join(' '), bad, ['lat', 'lon']);
  if (problems.length) return;
  stopGeo();
  setMyLocation(lat, lon, 'manual');
}

// The point `dist` metres from `p` on the initial bearing `bearingDeg`
// (great circle, as the server measures).
function destination(p, bearingDeg, dist) {
  const rad = Math.PI / 180;
  const d = dist / EARTH_RADIUS_M;
  const t = bearingDeg * rad;
  const f1 = p.lat * rad;
  const f2 = Math.asin(Math.sin(f1) * Math.cos(d) + Math.cos(f1) * Math.sin(d) * Math.cos(t));
  const l2 = p.lon * rad + Math.atan2(Math.sin(t) * Math.sin(d) * Math.cos(f1), Math.cos(d) - Math.sin(f1) * Math.sin(f2));
  return { lat: f2 / rad, lon: l2 / rad };
}

// Offsets (metres east/north) from a point, equirectangular: fine at these scales.
function offsetLatLon({ lat, lon }, east, north) {
  const rad = Math.PI / 180;
  const nlat = lat + (north / EARTH_RADIUS_M) / rad;
  let nlon = lon + (east / (EARTH_RADIUS_M * Math.cos(lat * rad))) / rad;
  nlon = ((nlon + 540) % 360) - 180;
  return { lat: Math.max(-90, Math.min(90, nlat)), lon: nlon };
}

// ---------- WebSocket ----------

function setConn(kind, text = kind) {
  const el = $('#conn-status');
  el.dataset.state = kind;
  el.textContent = text;
}

// The token never goes in a URL (proxies' logs, history, consoles keep
// URLs): a single-use ticket, valid seconds, opens the socket instead.
async function connect() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  if (!state.session) return;
  if (!navigator.onLine) { setConn('offline', 'offline (no network)'); return; }
  setConn('connecting', 'connecting…');
  state.lastWsError = null;
  const session = state.session;
  let ticket;
  try {
    ({ ticket } = await api('POST', '/v1/ws-ticket'));
  } catch (err) {
    if (state.session !== session) return;
    if (err.status === 401) { endSession('Your login is no longer valid. Please log in again.'); return; }
    scheduleReconnect(err);
    return;
  }
  if (state.session !== session || state.ws) return; // logged out, or another attempt won
  const url = new URL('/v1/ws', location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.searchParams.set('ticket', ticket);
  const ws = new WebSocket(url);
  state.ws = ws;
  let opened = false;
  ws.onopen = () => { opened = true; };
  ws.onmessage = (e) => { if (ws === state.ws) onFrame(e.data); };
  ws.onclose = (e) => { if (ws === state.ws) onClose(e, opened); };
}

function onFrame(data) {
  let msg;
  try { msg = JSON.parse(data); } catch {
    notify('The server sent a frame that is not JSON.');
    return;
  }
  switch (msg.type) {
    case 'snapshot':
      state.nearby = new Map(msg.friends.map((f) => [f.id, f]));
      if (msg.self_location) adoptRemoteLocation(msg.self_location, 'server');
      state.intervalMs = msg.interval_ms ?? null;
      // The list as of this socket's start (changes from then on are
      // pushed); an older server sends none: read it.
      if (msg.relations) {
        friendPushes++; // newer than any list read in flight
        applyFriendList(msg.relations);
      }
      else refreshFriendsSoon();
      loadGhost().catch((err) => report(err)); // another device may have changed it
      if (msg.discoverable) state.discoverable = msg.discoverable;
      state.strangers.clear(); // they come again as they announce themselves
      renderStrangers();
      state.live = true;
      state.attempt = 0;
      clearNotes('conn');
      setConn('live');
      if (state.me) queueSend();
      break;
    case 'friend_location':
      if (leaving.shown.has(msg.id)) clearNotes('left'); // back already
      state.nearby.set(msg.id, { id: msg.id, distance_m: msg.distance_m, bearing_deg: msg.bearing_deg, updated_at: msg.updated_at, approximate: msg.approximate === true });
      if (state.friends.get(msg.id)?.status !== 'friends') refreshFriendsSoon(); // a request just accepted
      break;
    case 'friend_update': {
      friendPushes++;
      const { type: _type, ...row } = msg;
      const before = state.friends.get(row.id);
      state.friends.set(row.id, { ...row, username: row.username ?? lookedUp.get(row.id) ?? before?.username ?? `user #${row.id}` });
      if (row.status === 'incoming' && before?.status !== 'incoming') {
        notify(`${row.username ?? `user #${row.id}`} wants to be your friend.`, 'info', 0, `req-${row.id}`, CARD.friends());
      } else if (row.status !== 'incoming') {
        clearNotes(`req-${row.id}`); // answered (here or on another device)
      }
      renderFriends();
      renderNearby();
      break;
    }
    case 'friend_removed':
      friendPushes++;
      lastNames.set(msg.id, nameOf(msg.id));
      clearNotes(`req-${msg.id}`);
      state.friends.delete(msg.id);
      state.nearby.delete(msg.id);
      renderFriends();
      renderNearby();
      break;
    case 'interval':
      state.intervalMs = msg.interval_ms;
      // The next refresh at the new pace, counted from the last report.
      if (state.me && state.live && state.lastSent && !REMOTE_SOURCES.has(state.me.source)) {
        clearTimeout(state.sendTimer);
        state.sendTimer = setTimeout(sendLocation, Math.max(0, state.lastSent + interval() - Date.now()));
      }
      renderLocationInfo();
      break;
    case 'self_location':
      adoptRemoteLocation(msg, 'elsewhere');
      break;
    case 'discoverable':
      if (msg.enabled && !state.discoverable.enabled) {
        // Others announce themselves every few seconds: looking, until then.
        state.discoverableSince = Date.now();
        setTimeout(renderStrangers, LOOKING_MS + 100);
      }
      state.discoverable = { enabled: msg.enabled, until: msg.until ?? null };
      if (!msg.enabled) state.strangers.clear();
      renderStrangers();
      break;
    case 'stranger_nearby':
      state.strangers.set(msg.id, { id: msg.id, bucket_km: msg.bucket_km, bearing_deg: msg.bearing_deg ?? null });
      renderStrangers();
      break;
    case 'stranger_left':
      state.strangers.delete(msg.id);
      renderStrangers();
      break;
    case 'friend_left': {
      const shown = state.nearby.delete(msg.id);
      // Not news to the one who removed them.
      const byMe = msg.reason === 'unfriended' && removedByMe.delete(msg.id);
      if (shown && !byMe) sayLeft(msg.id, msg.reason);
      if (msg.reason === 'unfriended') refreshFriendsSoon();
      break;
    }
    case 'error':
      state.lastWsError = msg;
      if (msg.code === 'going_away') {
        state.reconnectAfter = msg.reconnect_after_ms ?? 0;
        notify('The server is restarting; reconnecting shortly.', 'info', 5000, 'conn');
      }
      else if (!['token_expired', 'token_revoked', 'account_deleted'].includes(msg.code)) { // those: see onClose
        notify(msg.message);
      }
      break;
    default:
      break; // unknown types are ignored, as the protocol allows
  }
  renderNearby();
  renderMap();
}

// Friends who left the list within a moment are told in one message
// ("minji, jisoo and yuna moved out of range."), not one each.
const leaving = { pending: [], timer: null, shown: new Set() };
const removedByMe = new Set();

function sayLeft(id, reason) {
  leaving.pending.push([id, reason, nameOf(id)]); // the name now: the row may go first
  clearTimeout(leaving.timer);
  leaving.timer = setTimeout(() => {
    const byReason = new Map();
    for (const [, why, name] of leaving.pending) {
      if (!byReason.has(why)) byReason.set(why, []);
      byReason.get(why).push(name);
    }
    leaving.shown = new Set(leaving.pending.map(([who]) => who));
    leaving.pending = [];
    const names = (list) => (list.length === 1 ? list[0] : `${list.slice(0, -1).join(', ')} and ${list.at(-1)}`);
    const text = [...byReason].map(([why, list]) => `${names(list)} ${(LEFT_REASONS[why] ?? ['left', 'left'])[list.length === 1 ? 0 : 1]}`).join('; ');
    notify(`${text}.`, 'info', 5000, 'left', CARD.nearby());
  }, 400);
}

function onClose(event, opened) {
  state.ws = null;
  state.live = false;
  clearTimeout(state.sendTimer);
  if (!state.session) return;
  renderNearby();
  if (event.code === 1008 && state.lastWsError?.code === 'account_deleted') {
    // This page's own deletion (whose reply may come after the close), or
    // another device's: not an error.
    endSession();
    notify('Your account was deleted.', 'info', 8000);
    return;
  }
  if (event.code === 1008) {
    const why = state.lastWsError?.message ?? event.reason ?? 'token refused';
    endSession(`Signed out by the server: ${why}. Please log in again.`);
    return;
  }
  if (event.code === 1009) notify('The server closed the connection: a frame was too large (client bug).', 'error', 0, 'conn');
  if (!opened) {
    // The handshake failed: a refused token (HTTP 401) looks like any network
    // failure to a browser, so ask over REST; a 401 there ends the session.
    api('GET', '/v1/friends').then(() => scheduleReconnect(), (err) => {
      if (state.session) scheduleReconnect(err);
    });
    return;
  }
  scheduleReconnect();
}

// The server's suggestion (once), then exponential backoff with full
// jitter: a node draining thousands of clients must not see them return in
// the same second.
function scheduleReconnect(err) {
  const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
  const delay = (state.reconnectAfter ?? 0) + Math.random() * cap;
  state.reconnectAfter = 0;
  state.attempt += 1;
  state.retryAt = Date.now() + delay;
  if (err && state.attempt === 1) notify(`Connection lost: ${describe(err)}`, 'error', 0, 'conn');
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(connect, delay);
  tickConn();
}

function tickConn() {
  if (state.retryTimer && !state.ws) {
    const secs = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
    setConn('reconnecting', `reconnecting in ${secs} s`);
  }
}

// ---------- rendering ----------

// An approximate friend's distance is whole kilometres between the
// centres of both users' ~3 km cells.
function fmtFriendDistance(f) {
  if (!f.approximate) return fmtDistance(f.distance_m);
  return f.distance_m < 1000 ? 'within ~3 km' : `about ${Math.round(f.distance_m / 1000)} km`;
}

// A moment as the clock shows it; the day too when it is not today.
function fmtClock(ms) {
  const d = new Date(ms);
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  return d.toDateString() === new Date().toDateString()
    ? time : `${d.toLocaleDateString([], { weekday: 'short', day: 'numeric', month: 'short' })} ${time}`;
}

function fmtDistance(m) {
  if (m < 1000) return `${Math.round(m)} m`;
  if (m < 10000) return `${(m / 1000).toFixed(2)} km`;
  return `${(m / 1000).toFixed(1)} km`;
}

function fmtAge(ms) {
  const secs = Math.max(0, Math.round(ms / 1000));
  if (secs < 60) return `updated ${secs} s ago`;
  if (secs < 3600) return `updated ${Math.floor(secs / 60)} min ${secs % 60} s ago`;
  return `updated ${Math.floor(secs / 3600)} h ago`;
}

const sortedNearby = () => [...state.nearby.values()].sort((a, b) => a.distance_m - b.distance_m);

function renderNearby() {
  const list = $('#nearby');
  list.replaceChildren(...sortedNearby().map((f) => {
    const name = nameOf(f.id);
    return h('li', { 'data-id': f.id, 'data-username': name, 'data-distance-m': f.distance_m, 'data-approximate': String(Boolean(f.approximate)) },
      h('span', { class: 'avatar', style: `background:${colourOf(f.id)}`, 'aria-hidden': 'true' }, name.slice(0, 1).toUpperCase()),
      h('button', { type: 'button', class: 'link name', 'data-action': 'details', 'aria-label': `${name}: show details` }, name),
      h('span', { class: 'distance', title: f.approximate ? 'They share only which ~3 km area they are in' : '' }, fmtFriendDistance(f)),
      h('span', { class: 'age', 'data-updated-at': f.updated_at }, fmtAge(Date.now() - f.updated_at)));
  }));
  list.classList.toggle('stale', !state.live);
  $('#nearby-empty').hidden = state.nearby.size > 0;
  $('#nearby-empty').textContent = state.me ? 'No friend within range right now.' : 'Set your location to see friends nearby.';
}

function tickAges() {
  for (const el of document.querySelectorAll('#nearby .age')) {
    el.textContent = fmtAge(Date.now() - Number(el.dataset.updatedAt));
  }
}

const STATUS_TEXT = { friends: 'friends', incoming: 'wants to be friends', outgoing: 'request sent' };
const STATUS_ORDER = { incoming: 0, friends: 1, outgoing: 2 };

function renderFriends() {
  const rows = [...state.friends.values()].sort((a, b) =>
    (STATUS_ORDER[a.status] ?? 9) - (STATUS_ORDER[b.status] ?? 9) || a.username.localeCompare(b.username));
  $('#friends').replaceChildren(...rows.map((f) => {
    const actions = [];
    if (f.status === 'incoming') {
      actions.push(h('button', { type: 'button', 'data-action': 'accept', 'aria-label': `Accept ${f.username}` }, 'Accept'),
        h('button', { type: 'button', class: 'secondary', 'data-action': 'remove', 'aria-label': `Decline ${f.username}` }, 'Decline'));
    } else if (f.status === 'outgoing') {
      actions.push(h('button', { type: 'button', class: 'secondary', 'data-action': 'remove', 'aria-label': `Cancel your request to ${f.username}` }, 'Cancel'));
    } else {
      const precision = f.sharing_precision ?? 'precise';
      const spans = SHARE_SPANS.map(([ms, text]) => h('option', { value: ms, selected: !f.sharing_until && ms === '' }, text));
      if (f.sharing_until) spans.unshift(h('option', { value: 'keep', selected: true }, `until ${fmtClock(f.sharing_until)}`));
      actions.push(h('label', { class: 'toggle', title: 'Share my location with this friend' },
        h('input', { type: 'checkbox', 'data-action': 'sharing', checked: Boolean(f.sharing), 'aria-label': `Share my location with ${f.username}` }), 'sharing'),
      h('select', { 'data-action': 'share-for', title: 'How long they see you', 'aria-label': `How long ${f.username} sees you`, disabled: !f.sharing }, ...spans),
      h('select', { 'data-action': 'precision', title: 'What they see of you', 'aria-label': `What ${f.username} sees of you`, disabled: !f.sharing },
        h('option', { value: 'precise', selected: precision === 'precise' }, 'exact distance'),
        h('option', { value: 'approximate', selected: precision === 'approximate' }, 'only ~3 km area')),
      h('button', { type: 'button', class: 'secondary', 'data-action': 'remove', 'aria-label': `Remove ${f.username}` }, 'Remove'));
    }
    return h('li', {
      'data-id': f.id, 'data-username': f.username, 'data-status': f.status, 'data-sharing': String(f.sharing),
      'data-precision': f.sharing_precision ?? 'precise', 'data-until': f.sharing_until ?? '',
    },
      h('span', { class: 'avatar', style: `background:${colourOf(f.id)}`, 'aria-hidden': 'true' }, f.username.slice(0, 1).toUpperCase()),
      h('span', { class: 'name' }, f.username),
      h('span', { class: `badge ${f.status}` }, STATUS_TEXT[f.status] ?? f.status),
      f.status === 'friends' ? h('span', { class: 'they-share' }, theyShare(f)) : '',
      f.status === 'friends' ? h('span', { class: 'you-share' }, youShare(f)) : '',
      h('span', { class: 'actions' }, ...actions));
  }));
  $('#friends-empty').hidden = state.friends.size > 0;
  renderLocationInfo(); // who sees you may have changed
  // A grant that ends is not pushed to the granter: read the list again then.
  const ends = [...state.friends.values()].flatMap((f) => [f.sharing_until, f.shares_with_you_until]).filter(Boolean);
  clearTimeout(state.shareTimer);
  if (ends.length) state.shareTimer = setTimeout(refreshFriendsSoon, Math.max(0, Math.min(...ends) - Date.now()) + 300);
}

const SHARE_SPANS = [['', 'for good'], ['3600000', 'for 1 hour'], ['28800000', 'for 8 hours'], ['86400000', 'for 1 day']];

// Both directions of a friendship, in words.
function theyShare(f) {
  if (!f.shares_with_you) return 'they share with you: no';
  let text = 'they share with you: yes';
  if (f.shares_with_you_precision === 'approximate') text += ', approximately';
  if (f.shares_with_you_until) text += ` until ${fmtClock(f.shares_with_you_until)}`;
  return text;
}

function youShare(f) {
  if (!f.sharing) return 'you share: off';
  let text = `you share: ${f.sharing_precision === 'approximate' ? 'approximate' : 'precise'}`;
  if (f.sharing_until) text += ` until ${fmtClock(f.sharing_until)}`;
  return text;
}

// Who can see you, as the server would decide it now.
function visibilityText() {
  if (state.ghost?.ghost) return ' Ghost mode: hidden from every friend.';
  const n = [...state.friends.values()].filter((f) => f.status === 'friends' && f.sharing).length;
  if (!n) return ' No friend sees you: you share with nobody.';
  return ` ${n === 1 ? '1 friend sees' : `${n} friends see`} your distance.`;
}

function renderLocationInfo() {
  const el = $('#location-info');
  if (!state.me) { el.textContent = 'No location yet: friends see you once you set one.'; return; }
  const from = {
    manual: 'set by hand', map: 'placed on the map', device: 'from this device',
    server: 'as the server last had it', elsewhere: 'from another of your devices',
  }[state.me.source];
  if (REMOTE_SOURCES.has(state.me.source)) {
    el.textContent = `${state.me.lat.toFixed(5)}, ${state.me.lon.toFixed(5)} (${from}).${visibilityText()}`;
    return;
  }
  const sent = state.lastSent ? `last sent ${Math.round((Date.now() - state.lastSent) / 1000)} s ago` : 'not sent yet';
  const pace = state.intervalMs
    ? ` Reporting every ${state.intervalMs % 60000 === 0 ? `${state.intervalMs / 60000} min` : `${state.intervalMs / 1000} s`}, as the server suggests.`
    : '';
  el.textContent = `${state.me.lat.toFixed(5)}, ${state.me.lon.toFixed(5)} (${from}); ${state.live ? sent : 'will send when connected'}.${pace}${visibilityText()}`;
  el.dataset.intervalMs = state.intervalMs ?? '';
}

// A stable colour per friend, from the id.
function hashOf(id) {
  let x = 2166136261;
  for (const c of String(id)) x = Math.imul(x ^ c.charCodeAt(0), 16777619) >>> 0;
  return x;
}
const colourOf = (id) => `hsl(${hashOf(id) % 360} 55% 45%)`;

const MAP_R = 180; // SVG units from centre to the outer ring
// Radial scale: square root, so friends a few hundred metres away do not pile
// up on the centre when the outer ring is kilometres out.
const toUnits = (m, range) => MAP_R * Math.sqrt(Math.min(m, range) / range);
const toMetres = (u, range) => range * (u / MAP_R) ** 2;
const SCALES = [200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
const APPROX_M = 2000; // how far from the point shown an approximate friend may be

function mapScale() {
  // An approximate friend is somewhere within ~2 km of the point shown.
  const far = Math.max(0, ...[...state.nearby.values()].map((f) => f.distance_m + (f.approximate ? APPROX_M : 0)));
  const want = Math.max(far * 1.15, state.nearby.size ? 500 : 2000);
  return SCALES.find((r) => r >= want) ?? SCALES[SCALES.length - 1];
}

// ---------- the radar ----------

// Text widths for label placement, measured once per text (the radar may be
// hidden, where the DOM measures nothing).
const measure = (() => {
  const ctx = document.createElement('canvas').getContext('2d');
  const cache = new Map();
  return (text, font) => {
    const key = `${font}|${text}`;
    if (!cache.has(key)) {
      ctx.font = font;
      if (cache.size > 500) cache.clear();
      cache.set(key, ctx.measureText(text).width);
    }
    return cache.get(key);
  };
})();
const RADAR_FONT = '600 11.5px system-ui, sans-serif';
const RADAR_LABEL_H = 15;

// The friend's name and distance, as the labels on both views read.
const labelOf = (f) => `${nameOf(f.id)} · ${fmtFriendDistance(f)}`;

function renderRadar() {
  const svg = $('#map');
  const range = mapScale();
  const parts = [
    s('rect', { x: -200, y: -200, width: 400, height: 400, class: 'bg' }),
    s('line', { x1: -MAP_R, y1: 0, x2: MAP_R, y2: 0, class: 'axis' }),
    s('line', { x1: 0, y1: -MAP_R, x2: 0, y2: MAP_R, class: 'axis' }),
    s('text', { x: 0, y: -MAP_R - 6, class: 'compass' }, 'N'),
  ];
  // What a friend's label must keep clear of: ring captions, the compass,
  // "you", every dot, and (if it can) the rings themselves.
  const scene = { dots: [{ x: 0, y: 0, r: 9 }], boxes: [], rings: [], bounds: { x0: -198, y0: -198, x1: 198, y1: 198 } };
  scene.boxes.push({ x0: -8, y0: -MAP_R - 19, x1: 8, y1: -MAP_R - 3 }); // N
  const shown = sortedNearby().map((f) => {
    // The server's bearing; a stable made-up one only for old servers that send none.
    const angle = ((f.bearing_deg ?? hashOf(f.id) % 360) * Math.PI) / 180;
    const d = toUnits(f.distance_m, range);
    return { f, x: d * Math.sin(angle), y: -d * Math.cos(angle) };
  });
  // Crowded dots are spread apart (a stem to their true point), like the
  // street map's avatars; from here on x, y are where a dot is drawn.
  const spread = spreadAll(shown.map(({ x, y }) => ({ x, y })), { x: 0, y: 0 }, 9, 7, true);
  [...spread.entries()].forEach(([truth, at], i) => Object.assign(shown[i], { tx: truth.x, ty: truth.y, x: at.x, y: at.y }));
  // Each ring's caption inside it, on the east-west axis, on whichever
  // side (above or below the axis) no friend's dot is.
  for (const r of [range / 10, range / 2, range]) {
    const ru = toUnits(r, range);
    const caption = r < 1000 ? `${r} m` : `${r / 1000} km`;
    const w = measure(caption, '11px system-ui, sans-serif');
    const spots = [[ru - 4, -5], [-ru + 4 + w, -5], [ru - 4, 14], [-ru + 4 + w, 14]]
      .map(([x, y]) => ({ x, y, box: { x0: x - w, y0: y - 11, x1: x, y1: y + 3 } }));
    const free = (b) => !shown.some(({ x, y }) => Math.hypot(Math.max(b.x0 - x, 0, x - b.x1), Math.max(b.y0 - y, 0, y - b.y1)) < 10);
    const at = spots.find((c) => free(c.box)) ?? spots[0];
    parts.push(s('circle', { cx: 0, cy: 0, r: ru, class: 'ring' }),
      s('text', { x: at.x, y: at.y, class: 'ring-label' }, caption));
    scene.rings.push({ cx: 0, cy: 0, r: ru });
    scene.boxes.push(at.box);
  }
  const meText = state.me ? 'you' : 'you (no location)';
  const meW = measure(meText, '700 11px system-ui, sans-serif');
  scene.boxes.push({ x0: -meW / 2, y0: 10, x1: meW / 2, y1: 24 });
  for (const { x, y } of shown) scene.dots.push({ x, y, r: 9 });
  // Strangers: anonymous dots at the middle of their band, towards their
  // area (those in your own area are listed only).
  const strangers = [];
  for (const st of state.strangers.values()) {
    if (st.bearing_deg == null) continue;
    const angle = (st.bearing_deg * Math.PI) / 180;
    const d = toUnits((st.bucket_km[0] + st.bucket_km[1]) * 500, range);
    const x = d * Math.sin(angle);
    const y = -d * Math.cos(angle);
    scene.dots.push({ x, y, r: 6 });
    strangers.push(s('circle', { cx: x, cy: y, r: 5, class: 'stranger', 'data-id': st.id }));
  }
  // Nearest first: they get the best spots.
  const spots = placeLabels(shown.map(({ f, x, y }) => ({
    x, y, r: 9, w: measure(labelOf(f), RADAR_FONT) + 6, h: RADAR_LABEL_H,
    short: { w: measure(nameOf(f.id), RADAR_FONT) + 6 },
  })), scene);
  const friends = [];
  shown.forEach(({ f, x, y }, i) => {
    const name = nameOf(f.id);
    const g = s('g', {
      class: f.approximate ? 'friend approximate' : 'friend', 'data-id': f.id, 'data-username': name,
      tabindex: 0, role: 'button', 'aria-label': `${labelOf(f)}: show details`,
    });
    if (state.selected === f.id) g.classList.add('selected');
    // Where an approximate friend may be: a shaded area (on the square-root
    // scale, its radius as seen from the friend's distance).
    if (f.approximate) g.append(s('circle', { cx: x, cy: y, r: Math.max(12, toUnits(f.distance_m + APPROX_M, range) - toUnits(f.distance_m, range)), class: 'area', fill: colourOf(f.id) }));
    const { tx, ty } = shown[i];
    if (Math.hypot(x - tx, y - ty) > 0.5) {
      g.append(s('line', { x1: tx, y1: ty, x2: x, y2: y, class: 'stem' }), s('circle', { cx: tx, cy: ty, r: 2.5, class: 'anchor' }));
    }
    g.append(s('circle', { cx: x, cy: y, r: 28, class: 'hit' }), // a tap target of 44 px on a phone
      s('circle', { cx: x, cy: y, r: 8, fill: colourOf(f.id), class: 'dot' }));
    const spot = spots[i];
    if (spot) {
      if (spot.leader) g.append(s('line', { x1: x, y1: y, x2: spot.x, y2: spot.y, class: 'leader' }));
      g.append(s('rect', { x: spot.box.x0, y: spot.box.y0, width: spot.box.x1 - spot.box.x0, height: spot.box.y1 - spot.box.y0, rx: 4, class: 'label-bg' }),
        s('text', { x: spot.x, y: spot.y + 4, class: 'friend-label' }, spot.short ? name : labelOf(f)));
    }
    parts.push(s('line', { x1: 0, y1: 0, x2: shown[i].tx, y2: shown[i].ty, class: 'spoke' }));
    friends.push(g);
  });
  parts.push(...strangers, s('circle', { cx: 0, cy: 0, r: 7, class: state.me ? 'me' : 'me unknown' }),
    s('text', { x: 0, y: 21, class: 'me-label' }, meText), ...friends); // nearest first: the tab order of the list
  svg.replaceChildren(...parts);
  $('#map-scale').textContent = `(outer ring ${range < 1000 ? `${range} m` : `${range / 1000} km`})`;
}

// ---------- the street map ----------

const geo = {
  map: null, tiles: null, overlay: null, me: null, ring: null,
  friends: new Map(),   // id -> {marker, area, key}
  follow: true,         // fit me and my friends until the user pans or zooms
  fitting: false,
  framed: '',           // who was in view at the last fit
  loaded: 0, failed: 0, timer: null,
  retried: 0,           // when "try again" was last pressed
};
const TILE_WAIT_MS = 10000;   // no tile by then: the radar view
const PIN_R = 15;             // a friend's avatar on the map, px
const ICON_HALF = 22;         // its tap target: 44 × 44 px around the avatar
const ME_PILL_HALF = 19;      // half the width of your "you" pill, px
const FRONT = 900;            // z of a focused or selected avatar; you are at 1000
const STREET_FONT = '600 12px system-ui, sans-serif'; // .pin-label

// The street map is there when the server names tiles and Leaflet loaded.
const streetMapPossible = () => Boolean(state.web.map && window.L);

async function loadWebConfig() {
  try {
    const cfg = await api('GET', '/v1/web-config');
    state.web = { ...state.web, ...cfg };
  } catch { /* an older server: radar only */ }
  $('#demo-hint').hidden = !state.web.demo;
  if (streetMapPossible()) { state.view = 'map'; state.tiles = 'loading'; }
}

function startStreetMap() {
  if (geo.map || !streetMapPossible() || state.view !== 'map') return;
  const L = window.L;
  geo.map = L.map('geo-map', { zoomControl: true, attributionControl: true, worldCopyJump: true })
    .setView([20, 0], 2);
  geo.map.attributionControl.setPrefix('<a href="https://leafletjs.com">Leaflet</a>');
  geo.tiles = L.tileLayer(state.web.map.tile_url, { attribution: state.web.map.attribution, maxZoom: 19 })
    .on('tileload', () => {
      geo.loaded += 1;
      clearTimeout(geo.timer);
      if (state.tiles !== 'ok') {
        state.tiles = 'ok';
        geo.retried = 0;
        renderMapChrome();
        if (geo.refocus) $('#geo-map').focus({ preventScroll: true });
        geo.refocus = false;
      }
    })
    .on('tileerror', () => {
      geo.failed += 1;
      if (!geo.loaded && geo.failed >= 3) tilesFailed();
    })
    .addTo(geo.map);
  geo.overlay = L.layerGroup().addTo(geo.map);
  const userMoved = () => { if (!geo.fitting && geo.follow) { geo.follow = false; renderMapChrome(); } };
  geo.map.on('dragstart', userMoved);
  geo.map.on('zoomstart', userMoved);
  // Panning or zooming with the keyboard (the map has focus) too.
  $('#geo-map').addEventListener('keydown', (e) => {
    if (e.target === $('#geo-map') && /^(Arrow|\+|-|=)/.test(e.key)) userMoved();
  });
  geo.map.on('zoomend moveend resize', placeStreetLabels);
  geo.map.on('click', guard((e) => {
    if (!state.placing) return;
    setPlacing(false);
    stopGeo();
    setMyLocation(e.latlng.lat, ((e.latlng.lng + 540) % 360) - 180, 'map');
  }));
  waitForTiles();
}

function waitForTiles() {
  clearTimeout(geo.timer);
  geo.loaded = 0;
  geo.failed = 0;
  state.tiles = 'loading';
  geo.timer = setTimeout(() => { if (!geo.loaded) tilesFailed(); }, TILE_WAIT_MS);
}

// Offline, blocked, or a wrong URL: the radar view, and a note saying why.
function tilesFailed() {
  if (state.tiles === 'failed') return;
  clearTimeout(geo.timer);
  state.tiles = 'failed';
  state.view = 'radar';
  renderMap();
  if (geo.refocus) $('#map-retry').focus(); // pressed again: still there
  geo.refocus = false;
}

function retryStreetMap() {
  geo.refocus = document.activeElement === $('#map-retry');
  geo.retried = Date.now();
  state.view = 'map';
  renderMap();
  waitForTiles();
  geo.tiles?.redraw();
  renderMapChrome();
}

function toggleView() {
  state.view = state.view === 'map' ? 'radar' : 'map';
  if (state.view === 'map' && state.tiles === 'failed') { retryStreetMap(); return; }
  renderMap();
}

// The map card's frame: which view, its buttons, the fallback note.
function renderMapChrome() {
  const card = $('#map-card');
  const street = state.view === 'map' && streetMapPossible();
  card.dataset.view = street ? 'map' : 'radar';
  card.dataset.tiles = streetMapPossible() ? state.tiles : 'none';
  $('#geo-map').hidden = !street;
  $('#map').toggleAttribute('hidden', street); // an SVG element has no .hidden
  $('#map-scale').hidden = street;
  $('#map-view').hidden = !streetMapPossible() || (state.tiles === 'failed' && !street);
  $('#map-view').textContent = street ? 'Radar view' : 'Street map';
  $('#map-follow').hidden = !street || geo.follow || !state.me;
  const failed = streetMapPossible() && state.tiles === 'failed';
  $('#map-note').hidden = !failed || street;
  if (failed) {
    let host = 'the tile server';
    try { host = new URL(state.web.map.tile_url.replace(/\{[^}]*\}/g, 'x')).host; } catch { /* as is */ }
    $('#map-note span').textContent = geo.retried
      ? `Tried again at ${new Date(geo.retried).toLocaleTimeString()}: still no tiles from ${host}. This is the radar view.`
      : `The street map could not load its tiles from ${host} (offline?), so this is the radar view: you at the centre, friends by distance and direction.`;
  }
  $('#map-hint').textContent = state.placing
    ? 'Click or tap the map where you are (Esc cancels).'
    : !state.me ? 'Set your location (under "My location", or "Put me on the map") to see your friends around you.'
    : street
      ? 'Friends are placed from their distance and direction to you. Tap a friend for details.'
      : 'You are at the centre, north up; friends are drawn at their distance and direction. Tap a friend for details.';
}

// A friend's position on the map, from their distance and bearing to me.
function friendLatLon(f) {
  const bearing = f.bearing_deg ?? hashOf(f.id) % 360;
  return destination(state.me, bearing, f.distance_m);
}

function pinOf(f) {
  const name = nameOf(f.id);
  // The marker stands at the friend's point; the avatar (with its label)
  // may be moved off it when avatars crowd, joined to it by a stem.
  const el = h('div', { class: 'pin-root' },
    h('span', { class: 'stem', hidden: true, 'aria-hidden': 'true' }),
    h('span', { class: 'anchor', hidden: true, 'aria-hidden': 'true' }),
    h('div', { class: 'pin-wrap' },
    // The initial is drawn by CSS: the marker's name is its label's text.
    h('span', { class: 'pin', style: `background:${colourOf(f.id)}`, 'data-initial': name.slice(0, 1).toUpperCase(), 'aria-hidden': 'true' }),
    h('span', { class: 'leader', 'aria-hidden': 'true' }),
    h('span', { class: 'pin-label', 'aria-hidden': 'true' })));
  return el;
}


// Where each avatar is drawn: at its point, or, where avatars (or you)
// crowd, spread on a circle around the crowd, the nearest friend first,
// each keeping its direction from the crowd's centre as best it can.
function spreadPins(points, me, pinR, meR, labelBelow) {
  const nodes = [me ? { x: me.x, y: me.y, me: true } : null, ...points].filter(Boolean);
  const parent = nodes.map((_, i) => i);
  const root = (i) => (parent[i] === i ? i : (parent[i] = root(parent[i])));
  for (let i = 0; i < nodes.length; i++) {
    for (let j = i + 1; j < nodes.length; j++) {
      const gap = nodes[i].me || nodes[j].me ? pinR + meR + 2 : 2 * pinR + 2;
      if (Math.hypot(nodes[i].x - nodes[j].x, nodes[i].y - nodes[j].y) < gap) parent[root(i)] = root(j);
    }
  }
  const groups = new Map();
  nodes.forEach((n, i) => { const r = root(i); if (!groups.has(r)) groups.set(r, []); groups.get(r).push(n); });
  const at = new Map(points.map((p) => [p, { x: p.x, y: p.y }]));
  for (const group of groups.values()) {
    const friends = group.filter((n) => !n.me);
    const centre = group.find((n) => n.me) ?? {
      x: friends.reduce((a, n) => a + n.x, 0) / friends.length,
      y: friends.reduce((a, n) => a + n.y, 0) / friends.length,
    };
    if (group.length < 2) continue;
    const k = friends.length;
    const withMe = group.some((n) => n.me);
    // Round you, the third below is left to a "you" label drawn there.
    const arc = withMe && labelBelow ? (4 * Math.PI) / 3 : 2 * Math.PI;
    const radius = Math.max(withMe ? pinR + meR + 4 : pinR + 3, ((2 * pinR + 6) * k) / arc);
    const angle = (n, i) => (Math.hypot(n.x - centre.x, n.y - centre.y) > 0.5 ? Math.atan2(n.y - centre.y, n.x - centre.x) : -Math.PI / 2 + i);
    const byAngle = friends.map((n, i) => ({ n, a: angle(n, i) })).sort((a, b) => a.a - b.a);
    const skip = withMe && labelBelow;
    const start = skip ? (5 * Math.PI) / 6 : byAngle[0].a; // from below-left, round by the top
    const slot = skip ? arc / Math.max(1, k - 1) : arc / k;
    byAngle.forEach(({ n }, j) => {
      // Alone with you: its own direction (turned up if that is the label's).
      const a = withMe && k === 1 ? byAngle[0].a + (skip && Math.sin(byAngle[0].a) > 0.5 ? Math.PI : 0) : start + j * slot;
      at.set(n, { x: centre.x + radius * Math.cos(a), y: centre.y + radius * Math.sin(a) });
    });
  }
  return at;
}

// Nothing of the last user stays on the map.
function clearStreetMap() {
  geo.overlay?.clearLayers();
  geo.friends.clear();
  geo.me = null;
  geo.ring = null;
  geo.follow = true;
  geo.framed = '';
}

function renderStreetMap() {
  const L = window.L;
  const m = geo.map;
  if (!m) return;
  const me = state.me;
  const keep = new Set();
  if (me) {
    const at = [me.lat, me.lon];
    if (!geo.me) {
      geo.me = L.marker(at, {
        // You: a pill saying so, one thing to keep clear of.
        icon: L.divIcon({ className: 'geo-me', html: '<span aria-hidden="true">you</span>', iconSize: [2 * ME_PILL_HALF, 22] }),
        interactive: false, keyboard: false, zIndexOffset: 1000, // you stay visible among friends
      }).addTo(geo.overlay);
      geo.ring = L.circle(at, { radius: state.web.radius_m, className: 'range-ring', interactive: false, fill: false }).addTo(geo.overlay);
    }
    geo.me.setLatLng(at);
    geo.ring.setLatLng(at);
    for (const f of sortedNearby()) {
      keep.add(f.id);
      const pos = friendLatLon(f);
      const at2 = [pos.lat, pos.lon];
      let entry = geo.friends.get(f.id);
      if (!entry) {
        const marker = L.marker(at2, {
          icon: L.divIcon({ className: 'geo-friend', html: pinOf(f), iconSize: [2 * ICON_HALF, 2 * ICON_HALF] }),
          keyboard: true, riseOnHover: true,
        }).on('click', (e) => {
          if (!state.placing) { selectFriend(f.id); return; }
          setPlacing(false); // placing means "I am here", even on a friend
          stopGeo();
          setMyLocation(e.latlng.lat, e.latlng.lng, 'map');
        }).addTo(geo.overlay);
        const el = marker.getElement();
        el.setAttribute('role', 'button');
        // A focused avatar comes to the front (of friends; you stay on top),
        // so its focus ring shows.
        el.addEventListener('focus', () => marker.setZIndexOffset(FRONT));
        el.addEventListener('blur', () => marker.setZIndexOffset(state.selected === f.id ? FRONT : 0));
        el.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); selectFriend(f.id); } });
        entry = { marker, area: null };
        geo.friends.set(f.id, entry);
      }
      entry.marker.setLatLng(at2);
      const el = entry.marker.getElement();
      el.dataset.id = f.id;
      el.dataset.username = nameOf(f.id);
      el.setAttribute('aria-label', `${labelOf(f)}: show details`);
      el.classList.toggle('selected', state.selected === f.id);
      if (document.activeElement !== el) entry.marker.setZIndexOffset(state.selected === f.id ? FRONT : 0);
      el.querySelector('.pin-label').textContent = labelOf(f);
      el.querySelector('.pin').dataset.initial = nameOf(f.id).slice(0, 1).toUpperCase(); // the name may come late
      if (f.approximate && !entry.area) {
        entry.area = L.circle(at2, { radius: APPROX_M, className: 'approx-area', color: colourOf(f.id), interactive: false }).addTo(geo.overlay);
      } else if (!f.approximate && entry.area) {
        entry.area.remove();
        entry.area = null;
      }
      entry.area?.setLatLng(at2);
    }
  } else if (geo.me) {
    geo.me.remove(); geo.ring.remove();
    geo.me = null; geo.ring = null;
  }
  for (const [id, entry] of geo.friends) {
    if (keep.has(id)) continue;
    entry.marker.remove();
    entry.area?.remove();
    geo.friends.delete(id);
  }
  frameStreetMap();
  placeStreetLabels();
}

// Following: me and every friend in view, refitted when someone joins or
// leaves, I move, or someone walks out of view.
function frameStreetMap() {
  const m = geo.map;
  if (!geo.follow || !state.me || $('#geo-map').hidden) return;
  const points = [[state.me.lat, state.me.lon], ...[...geo.friends.values()].map((e) => e.marker.getLatLng())];
  // An approximate friend's whole area is in view, so its edge shows.
  for (const e of geo.friends.values()) {
    if (e.area) { const b = e.area.getBounds(); points.push(b.getNorthWest(), b.getSouthEast()); }
  }
  const who = `${[...geo.friends.keys()].sort().join(',')}@${state.me.lat.toFixed(4)},${state.me.lon.toFixed(4)}`;
  const view = m.getBounds().pad(-0.1);
  if (who === geo.framed && points.every((p) => view.contains(p))) return;
  geo.framed = who;
  geo.fitting = true;
  try {
    if (points.length === 1) m.setView(points[0], Math.max(m.getZoom(), 14), { animate: false });
    else m.fitBounds(window.L.latLngBounds(points), { padding: [48, 48], maxZoom: 16, animate: false });
  } finally {
    geo.fitting = false;
  }
}

// Labels beside their avatars, clear of each other, of every avatar, of
// the map's controls and (where it can) of the range ring.
function placeStreetLabels() {
  const m = geo.map;
  if (!m || $('#geo-map').hidden || !state.me) return;
  const host = $('#geo-map').getBoundingClientRect();
  const size = m.getSize();
  const rel = (r) => ({ x0: r.left - host.left, y0: r.top - host.top, x1: r.right - host.left, y1: r.bottom - host.top });
  const meAt = m.latLngToContainerPoint([state.me.lat, state.me.lon]);
  const edge = destination(state.me, 90, state.web.radius_m);
  const ringR = Math.abs(m.latLngToContainerPoint([edge.lat, edge.lon]).x - meAt.x);
  const scene = {
    dots: [],
    boxes: [...document.querySelectorAll('#geo-map .leaflet-control, #geo-map .geo-me span')].map((c) => rel(c.getBoundingClientRect())),
    rings: [{ cx: meAt.x, cy: meAt.y, r: ringR }],
    bounds: { x0: 2, y0: 2, x1: size.x - 2, y1: size.y - 2 },
  };
  const order = sortedNearby().filter((f) => geo.friends.has(f.id));
  const points = order.map((f) => {
    const p = m.latLngToContainerPoint(geo.friends.get(f.id).marker.getLatLng());
    return { x: p.x, y: p.y };
  });
  const drawn = spreadAll(points, meAt, PIN_R, ME_PILL_HALF, false);
  const items = order.map((f, i) => {
    const el = geo.friends.get(f.id).marker.getElement();
    const p = drawn.get(points[i]);
    // The avatar off its point: moved there, with a stem back to the point.
    const dx = p.x - points[i].x;
    const dy = p.y - points[i].y;
    const moved = Math.hypot(dx, dy) > 0.5;
    el.querySelector('.pin-wrap').style.transform = moved ? `translate(${dx}px, ${dy}px)` : '';
    const stem = el.querySelector('.stem');
    stem.hidden = !moved;
    el.querySelector('.anchor').hidden = !moved;
    if (moved) {
      stem.style.width = `${Math.hypot(dx, dy)}px`;
      stem.style.transform = `rotate(${Math.atan2(dy, dx)}rad)`;
    }
    const label = el.querySelector('.pin-label');
    label.hidden = false; // measured as it reads now, whole
    label.textContent = labelOf(f);
    scene.dots.push({ x: p.x, y: p.y, r: PIN_R + 1 });
    const w = label.offsetWidth;
    const short = w - measure(labelOf(f), STREET_FONT) + measure(nameOf(f.id), STREET_FONT);
    return { f, el, label, x: p.x, y: p.y, r: PIN_R + 1, w, h: label.offsetHeight, short: { w: Math.ceil(short) + 1 } };
  });
  const spots = placeLabels(items, scene);
  items.forEach((it, i) => {
    const spot = spots[i];
    const leader = it.el.querySelector('.leader');
    it.el.dataset.labelled = String(Boolean(spot));
    it.label.hidden = !spot;
    leader.hidden = !spot?.leader;
    if (!spot) return;
    if (spot.short) it.label.textContent = nameOf(it.f.id);
    // Positions inside the icon, whose top left is ICON_HALF up and left of the dot.
    it.label.style.left = `${spot.box.x0 - it.x + ICON_HALF}px`;
    it.label.style.top = `${spot.box.y0 - it.y + ICON_HALF}px`;
    if (spot.leader) {
      const dx = spot.x - it.x;
      const dy = spot.y - it.y;
      leader.style.width = `${Math.hypot(dx, dy)}px`;
      leader.style.transform = `rotate(${Math.atan2(dy, dx)}rad)`;
    }
  });
}

// spreadPins again while a spread crowd lands on another avatar (up to 3
// rounds): point -> where it is drawn.
function spreadAll(points, me, pinR, meR, labelBelow) {
  let drawn = new Map(points.map((p) => [p, p]));
  for (let round = 0; round < 3; round++) {
    const now = points.map((p) => drawn.get(p));
    const next = spreadPins(now, me, pinR, meR, labelBelow);
    if (now.every((q) => { const n = next.get(q); return Math.hypot(n.x - q.x, n.y - q.y) < 0.5; })) break;
    drawn = new Map(points.map((p, i) => [p, next.get(now[i])]));
  }
  return drawn;
}

// ---------- a friend's details ----------

function selectFriend(id) {
  state.selected = id;
  renderMap();
  $('#details-close').focus({ preventScroll: true });
}

function closeDetails() {
  const id = state.selected;
  state.selected = null;
  renderMap();
  // Back to where the person was: the friend on the map, if still there.
  [...document.querySelectorAll(`#map-card [data-id="${id}"][role="button"]`)].find((el) => el.checkVisibility())
    ?.focus({ preventScroll: true });
}

function renderDetails() {
  const box = $('#friend-details');
  const id = state.selected;
  const row = id == null ? null : state.friends.get(id);
  if (id == null || (!row && !state.nearby.has(id))) {
    box.hidden = true;
    if (id != null) state.selected = null;
    return;
  }
  const f = state.nearby.get(id);
  const name = nameOf(id);
  box.hidden = false;
  box.dataset.id = id;
  box.querySelector('.avatar').style.background = colourOf(id);
  box.querySelector('.avatar').textContent = name.slice(0, 1).toUpperCase();
  $('#details-name').textContent = name;
  const facts = [];
  if (f) {
    const dir = f.bearing_deg == null ? '' : ` to the ${WINDS[Math.round(f.bearing_deg / 45) % 8]}`;
    facts.push(['Distance', `${fmtFriendDistance(f)}${dir}`, 'distance'],
      ['Updated', `${fmtAge(Date.now() - f.updated_at).replace(/^updated /, '')} (${fmtClock(f.updated_at)})`, 'updated']);
  } else {
    facts.push(['Distance', 'not nearby right now', 'distance']);
  }
  if (row) {
    facts.push(['Shares with you', theyShare(row).replace(/^they share with you: /, ''), 'they-share'],
      ['You share', youShare(row).replace(/^you share: /, ''), 'you-share']);
  }
  // Rebuilt only when a fact changes (the age ticks every second).
  const dl = box.querySelector('dl');
  const text = JSON.stringify(facts);
  if (dl.dataset.facts !== text) {
    dl.dataset.facts = text;
    dl.replaceChildren(...facts.flatMap(([k, v, key]) => [h('dt', {}, k), h('dd', { 'data-fact': key }, v)]));
  }
}

// ---------- either view ----------

function renderMap() {
  if (state.view === 'map' && streetMapPossible() && $('#app-view').hidden === false) startStreetMap();
  const wasHidden = $('#geo-map').hidden;
  renderMapChrome();
  if (state.view === 'map' && geo.map) {
    if (wasHidden) { geo.map.invalidateSize(); geo.framed = ''; }
    renderStreetMap();
  } else {
    renderRadar();
  }
  renderDetails();
}

function renderAll() {
  renderFriends();
  renderNearby();
  renderMap();
  renderLocationInfo();
}

// Putting yourself on the map is a mode, turned on by its button: a stray
// click on the map must not move you kilometres away.
function setPlacing(on) {
  state.placing = on;
  const btn = $('#map-place');
  btn.setAttribute('aria-pressed', String(on));
  btn.textContent = on ? 'Cancel' : 'Put me on the map';
  $('#map-card').dataset.placing = String(on);
  renderMapChrome();
}

function placeOnMap(event) {
  const friend = event.target.closest('g.friend');
  if (!state.placing) {
    if (friend) selectFriend(friend.dataset.id);
    return;
  }
  setPlacing(false);
  const svg = $('#map');
  const pt = new DOMPoint(event.clientX, event.clientY).matrixTransform(svg.getScreenCTM().inverse());
  const units = Math.hypot(pt.x, pt.y);
  const metresPerUnit = units > 0 ? toMetres(units, mapScale()) / units : 0;
  const base = state.me ?? (validLatLon($('#lat').valueAsNumber, $('#lon').valueAsNumber)
    ? { lat: $('#lat').valueAsNumber, lon: $('#lon').valueAsNumber } : DEMO_CENTRE);
  const next = offsetLatLon(base, pt.x * metresPerUnit, -pt.y * metresPerUnit);
  stopGeo();
  setMyLocation(next.lat, next.lon, 'map');
}

// ---------- wiring ----------

function init() {
  // A refusal that is about a field is said under it.
  const atField = (err) => {
    const field = { username_taken: 'username', invalid_username: 'username', invalid_password: 'password', bad_credentials: 'password' }[err?.code];
    if (!field) throw err;
    const note = $(`#${field}-problem`);
    note.textContent = describe(err);
    note.hidden = false;
    $(`#${field}`).setAttribute('aria-invalid', 'true');
    $(`#${field}`).focus();
  };
  $('#auth-form').addEventListener('submit', guard(async (e) => {
    e.preventDefault();
    if (!checkAuthFields(false)) return;
    await logIn(credentials()).catch(atField);
  }));
  $('#signup').addEventListener('click', guard(async () => {
    if (!checkAuthFields(true)) return;
    const creds = credentials();
    let user;
    try {
      user = await api('POST', '/v1/users', creds);
    } catch (err) {
      atField(err);
      return;
    }
    await logIn(creds);
    // It stays (dismissable) until its advice is followed: no jump of the
    // page when it would expire.
    notify(`Welcome, ${user.username}! Next: add a friend by their username, and set your location (or use this device's).`, 'info', 0, 'welcome');
  }));
  $('#logout').addEventListener('click', async () => {
    // Signed out here first: the server closing this page's socket for the
    // logout is then no news.
    const token = state.session?.token;
    endSession();
    $('#username').focus();
    try {
      const res = await fetch('/v1/sessions', { method: 'DELETE', headers: { Authorization: `Bearer ${token}` } });
      if (!res.ok && res.status !== 401) notify(`Log out failed on the server (HTTP ${res.status}); signed out here anyway.`);
    } catch {
      notify('Signed out here; the server could not be reached to end the login there too.');
    }
  });
  $('#friend-form').addEventListener('submit', guardIn($('#friend-form').closest('.card'), requestFriend));
  const friendsCard = $('#friends').closest('.card');
  const privacyCard = $('#privacy');
  const locationCard = $('#location-form').closest('.card');
  $('#friends').addEventListener('click', (e) => {
    if (e.target.closest('button[data-action]')) guardIn(friendsCard, friendAction)(e);
  });
  $('#friends').addEventListener('change', guardIn(friendsCard, friendAction));
  $('#friends-refresh').addEventListener('click', guardIn(friendsCard, refreshFriends));
  $('#ghost').addEventListener('change', guardIn(privacyCard, setGhost));
  $('#discoverable').addEventListener('change', guardIn($('#strangers-card'), setDiscoverable));
  $('#history-export').addEventListener('click', guardIn(privacyCard, exportHistory));
  $('#history-delete').addEventListener('click', guardIn(privacyCard, deleteHistory));
  $('#account-delete-form').addEventListener('submit', guardIn(privacyCard, deleteAccount));
  $('#ghost-for').addEventListener('change', guardIn(privacyCard, async () => { if ($('#ghost').checked) await setGhost(); }));
  $('#location-form').addEventListener('submit', guardIn(locationCard, setFromInputs));
  for (const f of ['username', 'password']) {
    $(`#${f}`).addEventListener('input', () => {
      $(`#${f}-problem`).hidden = true;
      $(`#${f}`).setAttribute('aria-invalid', 'false');
    });
  }
  for (const f of ['lat', 'lon']) $(`#${f}`).addEventListener('input', () => formProblem('location-problem', null, [], ['lat', 'lon']));
  $('#friend-name').addEventListener('input', () => formProblem('friend-problem', null, [], ['friend-name']));
  $('#use-geo').addEventListener('click', guardIn(locationCard, toggleGeo));
  $('#map').addEventListener('click', guardIn($('#map-card'), placeOnMap));
  $('#map-place').addEventListener('click', () => setPlacing(!state.placing));
  $('#map').addEventListener('keydown', (e) => {
    const friend = e.target.closest?.('g.friend');
    if (friend && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); selectFriend(friend.dataset.id); }
  });
  $('#nearby').addEventListener('click', (e) => {
    const li = e.target.closest('button[data-action="details"]')?.closest('li[data-id]');
    if (li) selectFriend(li.dataset.id);
  });
  $('#details-close').addEventListener('click', closeDetails);
  document.addEventListener('keydown', (e) => {
    if (e.key !== 'Escape') return;
    if (state.placing) setPlacing(false);
    else if (state.selected != null) closeDetails();
  });
  $('#map-view').addEventListener('click', toggleView);
  $('#map-retry').addEventListener('click', retryStreetMap);
  $('#map-follow').addEventListener('click', () => {
    geo.follow = true;
    geo.framed = '';
    renderMap();
    $('#geo-map').focus({ preventScroll: true }); // the button is gone: focus the map it moved
  });
  window.addEventListener('online', () => { if (state.session && !state.ws) { state.attempt = 0; connect(); } });
  window.addEventListener('offline', () => { if (state.session && !state.ws) setConn('offline', 'offline (no network)'); });
  setInterval(() => { tickAges(); tickConn(); renderLocationInfo(); renderDetails(); }, 1000);

  const saved = loadSession();
  // The map's settings first (they decide the view); the page works without.
  loadWebConfig().finally(() => {
    if (saved) startSession(saved);
    else renderAll();
  });
}

init();
