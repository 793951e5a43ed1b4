// End-to-end test of the browser client with Debian's headless Chromium.
//
//   node web-test/browser.mjs BASE_URL SCREENSHOT_PATH TILES_PORT [--restart-via-stdio]
//
// The server's --tile-url points at TILES_PORT, where this script serves
// stand-in street-map tiles (lib.mjs): A and B see the street map, C's
// browser is offline for tiles and must fall back to the radar view.
//
// Two users sign up through the page (A also logs out and in again), A finds
// B by username and asks, B accepts, both place themselves ~1.2 km apart and
// each must see the other at the haversine distance (±2%); B then moves 20 km
// away (beyond the default 8047 m radius) and both lists must drop the other.
// A screenshot of A's page, with B shown, is saved to SCREENSHOT_PATH.
// With --restart-via-stdio, once both see each other the script prints
// "RESTART SERVER" and waits for a line on stdin: the caller restarts the
// server on the same address meanwhile (SIGTERM, so it drains). Both pages
// must then have been told, gone through reconnecting, come back live on
// their own, and see each other again at the right distance.
// Exits 0 on success, 1 with a message on any failure.

import fs from 'node:fs';
import {
  axeCheck, checkMapLabels, checkMessagesClear, checkPlaceLabels, checkTapTargets, checkVendoredLeaflet,
  errorsShown, fail, launch, log, elapsed, reportFailure, serveTiles, watchPage,
} from './lib.mjs';

const EARTH_RADIUS_M = 6371008.8; // docs/protocol.md
const WAIT_MS = 8000;
const [BASE, SHOT, TILES_PORT, MODE] = process.argv.slice(2);
const RESTART = MODE === '--restart-via-stdio';
if (!BASE || !SHOT || !TILES_PORT || (MODE && !RESTART)) {
  console.error('usage: node web-test/browser.mjs BASE_URL SCREENSHOT_PATH TILES_PORT [--restart-via-stdio]');
  process.exit(2);
}
const TILES = `http://127.0.0.1:${TILES_PORT}/`;

const rad = (d) => (d * Math.PI) / 180;
const deg = (r) => (r * 180) / Math.PI;

function haversine(a, b) {
  const dLat = rad(b.lat - a.lat);
  const dLon = rad(b.lon - a.lon);
  const h = Math.sin(dLat / 2) ** 2 + Math.cos(rad(a.lat)) * Math.cos(rad(b.lat)) * Math.sin(dLon / 2) ** 2;
  return 2 * EARTH_RADIUS_M * Math.asin(Math.min(1, Math.sqrt(h)));
}

// The point `dist` metres from `p` on initial bearing `bearing` degrees.
function destination(p, bearing, dist) {
  const d = dist / EARTH_RADIUS_M;
  const t = rad(bearing);
  const f1 = rad(p.lat);
  const f2 = Math.asin(Math.sin(f1) * Math.cos(d) + Math.cos(f1) * Math.sin(d) * Math.cos(t));
  const l2 = rad(p.lon) + Math.atan2(Math.sin(t) * Math.sin(d) * Math.cos(f1), Math.cos(d) - Math.sin(f1) * Math.sin(f2));
  return { lat: deg(f2), lon: deg(l2) };
}

const rnd = () => Math.random().toString(36).slice(2, 10);
const userA = { name: `a_${rnd()}`, password: `pw-${rnd()}-${rnd()}` };
const userB = { name: `b_${rnd()}`, password: `pw-${rnd()}-${rnd()}` };
const userC = { name: `c_${rnd()}`, password: `pw-${rnd()}-${rnd()}` };
const posA = { lat: 37.5665, lon: 126.978 };
const posB = destination(posA, 60, 1200);
const farB = destination(posA, 0, 20000);
const expected = haversine(posA, posB);

let step = 'start';

async function signUp(page, user) {
  await page.goto(BASE);
  await page.fill('#username', user.name);
  await page.fill('#password', user.password);
  await page.click('#signup');
  await waitLive(page);
}

async function logIn(page, user) {
  await page.fill('#username', user.name);
  await page.fill('#password', user.password);
  await page.click('#login');
  await waitLive(page);
}

async function waitLive(page) {
  await page.waitForSelector('#app-view', { state: 'visible' });
  await page.waitForSelector('#conn-status[data-state="live"]');
}

async function setLocation(page, p) {
  await page.fill('#lat', String(p.lat));
  await page.fill('#lon', String(p.lon));
  await page.click('#set-location');
}

async function friendRow(page, name, status) {
  return page.waitForSelector(`#friends li[data-username="${name}"][data-status="${status}"]`);
}

async function nearbyDistance(page, name) {
  const li = await page.waitForSelector(`#nearby li[data-username="${name}"]`);
  const d = Number(await li.getAttribute('data-distance-m'));
  const age = await li.$eval('.age', (el) => el.textContent);
  if (!/^updated \d+ s ago$/.test(age)) fail(`age text for ${name} is ${JSON.stringify(age)}`);
  return d;
}

function checkDistance(who, got) {
  const err = Math.abs(got - expected) / expected;
  log(`${who}: distance ${got} m, expected ${expected.toFixed(1)} m (error ${(err * 100).toFixed(3)}%)`);
  if (!(err <= 0.02)) fail(`${who} shows ${got} m, expected ${expected.toFixed(1)} m ±2%`);
}

// Records every connection state and every message the page shows from now
// on, in window.__seen, so that short-lived ones are not missed.
async function recordChanges(page) {
  await page.evaluate(() => {
    const seen = { states: [], notes: [] };
    window.__seen = seen;
    const conn = document.querySelector('#conn-status');
    new MutationObserver(() => {
      if (seen.states.at(-1) !== conn.dataset.state) seen.states.push(conn.dataset.state);
    }).observe(conn, { attributes: true, attributeFilter: ['data-state'] });
    new MutationObserver((records) => {
      for (const r of records) for (const n of r.addedNodes) seen.notes.push(n.textContent.replace(/×$/, '').trim());
    }).observe(document.querySelector('#messages'), { childList: true });
  });
}

// One line from stdin (the caller's go-ahead).
function readLine() {
  return new Promise((resolve, reject) => {
    let buf = '';
    const onData = (chunk) => {
      buf += chunk;
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      process.stdin.off('data', onData);
      process.stdin.off('end', onEnd);
      process.stdin.pause();
      resolve(buf.slice(0, nl));
    };
    const onEnd = () => reject(new Error('stdin closed before the go-ahead'));
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', onData);
    process.stdin.on('end', onEnd);
  });
}

async function main() {
  step = 'the embedded Leaflet and the label placement';
  checkVendoredLeaflet();
  await checkPlaceLabels();
  const tiles = await serveTiles(Number(TILES_PORT));
  const browser = await launch();
  const pages = {};
  const problems = [];
  // While the server restarts, Chromium itself logs each refused handshake
  // or request (503 while the old node drains, or no listener yet) as a
  // console error; the page retrying through those is the behaviour under
  // test (and the page must still show no error, checked at the end).
  let restarting = false;
  let expectedHttp = new Set();
  const expectedSeen = [];
  const refused = [];
  try {
    for (const who of ['A', 'B']) {
      const ctx = await browser.newContext({ viewport: { width: 1200, height: 860 } });
      const page = await ctx.newPage();
      page.setDefaultTimeout(WAIT_MS);
      page.on('pageerror', (err) => problems.push(`${who} page error: ${err.message}`));
      // The long-lived token never goes in a URL (a ticket opens the socket).
      page.on('request', (r) => { if (/[?&]token=/.test(r.url())) problems.push(`${who} put its token in ${r.url()}`); });
      page.on('websocket', (ws) => { if (!/[?&]ticket=[0-9a-f]{64}$/.test(ws.url())) problems.push(`${who} opened a WebSocket without a ticket: ${ws.url().replace(/token=[0-9a-f]+/, 'token=…')}`); });
      page.on('console', (m) => {
        if (m.type() !== 'error') return;
        // The statuses a step provokes on purpose (a wrong password: 401,
        // an unknown name: 404) are the only HTTP errors allowed.
        const status = /^Failed to load resource: the server responded with a status of (\d+)/.exec(m.text())?.[1];
        if (status && expectedHttp.has(Number(status))) { expectedSeen.push(`${who}: ${status}`); return; }
        if (restarting && /^(WebSocket connection to .* failed|Failed to load resource: (net::ERR_CONNECTION_REFUSED|the server responded with a status of 503))/.test(m.text())) refused.push(`${who}: ${m.text().replace(/token=[0-9a-f]+/, 'token=…')}`);
        else problems.push(`${who} console: ${m.text()}`);
      });
      pages[who] = page;
    }
    const { A, B } = pages;

    step = 'the login page is accessible and says nothing is wrong';
    await A.goto(BASE);
    await axeCheck(A, 'login page, desktop');
    if (await A.isVisible('#conn-status')) fail('the login page shows a connection badge before anything happened');
    // Empty fields are said where they are, both at once; nothing is sent.
    await A.click('#login');
    await A.waitForSelector('#username-problem:not([hidden])');
    const fieldNotes = [await A.textContent('#username-problem'), await A.textContent('#password-problem')];
    if (fieldNotes.join(' | ') !== 'Enter your username. | Enter your password.') fail(`empty login fields say ${JSON.stringify(fieldNotes)}`);
    if (await A.locator('#messages .msg').count()) fail(`empty login fields raised a message: ${await A.textContent('#messages')}`);
    await A.fill('#username', 'x');
    await A.fill('#password', 'short');
    await A.click('#signup');
    await A.waitForFunction(() => document.querySelector('#password-problem').textContent.startsWith('Use 8'));
    if (!(await A.textContent('#username-problem')).startsWith('Use 3')) fail('sign-up did not report every invalid field');
    log(`field checks: "${fieldNotes.join('", "')}"; sign-up reports both fields`);

    step = 'A signs up, logs out and logs in again';
    await signUp(A, userA);
    await A.click('#logout');
    await A.waitForSelector('#auth-view', { state: 'visible' });
    // A wrong password is said under the password field, as a sentence.
    expectedHttp = new Set([401]);
    await A.fill('#username', userA.name);
    await A.fill('#password', 'not-the-password');
    await A.click('#login');
    await A.waitForSelector('#password-problem:not([hidden])');
    if (await A.textContent('#password-problem') !== 'Wrong username or password.') fail(`a wrong password says ${JSON.stringify(await A.textContent('#password-problem'))}`);
    expectedHttp = new Set();
    await logIn(A, userA);
    log(`A (${userA.name}) signed up, logged out and in; live`);

    step = 'B signs up';
    await signUp(B, userB);
    log(`B (${userB.name}) signed up; live`);

    step = 'A\'s mistakes are said where A typed';
    expectedHttp = new Set([404]);
    await A.fill('#friend-name', `nosuch_${rnd()}`);
    await A.click('#friend-request');
    await A.waitForSelector('#friend-problem:not([hidden])');
    const noSuch = await A.textContent('#friend-problem');
    if (!/^Nobody is called "nosuch_\w+": usernames are exact/.test(noSuch)) fail(`an unknown name says ${JSON.stringify(noSuch)}`);
    await A.fill('#friend-name', userA.name);
    await A.click('#friend-request');
    await A.waitForFunction(() => document.querySelector('#friend-problem').textContent.startsWith('That is you'));
    await A.fill('#lat', '95');
    await A.fill('#lon', '');
    await A.click('#set-location');
    await A.waitForSelector('#location-problem:not([hidden])');
    const where = await A.textContent('#location-problem');
    if (where !== 'Latitude goes from -90 to 90. Enter a longitude.') fail(`bad coordinates say ${JSON.stringify(where)}`);
    if (await A.getAttribute('#lat', 'aria-invalid') !== 'true' || await A.getAttribute('#lon', 'aria-invalid') !== 'true') fail('the bad fields are not marked invalid');
    if (await A.locator('#messages .msg.error').count()) fail(`field mistakes raised page messages: ${await A.textContent('#messages')}`);
    expectedHttp = new Set();
    log(`mistakes: "${noSuch}" | "${where}"; the HTTP errors they provoked: ${expectedSeen.join(', ')}`);

    step = 'A requests B by username';
    await A.fill('#friend-name', userB.name);
    await A.click('#friend-request');
    await friendRow(A, userB.name, 'outgoing');
    if (!(await A.isHidden('#friend-problem'))) fail('the friend form still shows a problem after a good request');

    step = 'B sees the request and accepts';
    await friendRow(B, userA.name, 'incoming'); // pushed over B's WebSocket (friend_update)
    await B.click(`#friends li[data-username="${userA.name}"] [data-action="accept"]`);
    await friendRow(B, userA.name, 'friends');
    await friendRow(A, userB.name, 'friends');
    for (const [page, other] of [[A, userB.name], [B, userA.name]]) {
      const on = await page.isChecked(`#friends li[data-username="${other}"] [data-action="sharing"]`);
      if (!on) fail(`sharing with ${other} is off by default`);
    }
    log('friends, sharing on both sides');

    step = 'both place themselves ~1.2 km apart';
    await setLocation(A, posA);
    await A.waitForSelector('#location-problem', { state: 'hidden' });
    await setLocation(B, posB);
    checkDistance('A sees B', await nearbyDistance(A, userB.name));
    checkDistance('B sees A', await nearbyDistance(B, userA.name));
    // A friend who can see them is near: the server asks both to report
    // fast (5 s by default), and the page says so.
    for (const page of [A, B]) await page.waitForSelector('#location-info[data-interval-ms="5000"]');
    log(`both report every 5 s: "${await A.textContent('#location-info')}"`);

    step = 'A sees B on the street map, and B\'s details';
    await A.waitForSelector('#map-card[data-view="map"][data-tiles="ok"]');
    const pinB = `#geo-map .geo-friend[data-username="${userB.name}"]`;
    await A.click(`${pinB} .pin`);
    await A.waitForSelector(`#friend-details[data-id]:not([hidden])`);
    const facts = await A.$$eval('#friend-details dd', (dds) => Object.fromEntries(dds.map((d) => [d.dataset.fact, d.textContent])));
    if (await A.textContent('#details-name') !== userB.name) fail(`the details name ${await A.textContent('#details-name')}`);
    if (!/^1\.\d\d km to the (north-east|east)$/.test(facts.distance)) fail(`details distance ${JSON.stringify(facts.distance)}`);
    if (!/^\d+ s ago \(/.test(facts.updated)) fail(`details updated ${JSON.stringify(facts.updated)}`);
    if (facts['they-share'] !== 'yes' || facts['you-share'] !== 'precise') fail(`details sharing ${JSON.stringify(facts)}`);
    log(`street map: A taps B and reads ${JSON.stringify(facts)}`);
    await A.click('#details-close');
    await A.waitForSelector('#friend-details', { state: 'hidden' });
    await checkMapLabels(A, 'A');
    // The radar, by keyboard: B's dot is a button.
    await A.click('#map-view');
    await A.waitForSelector('#map-card[data-view="radar"]');
    await A.focus(`#map g.friend[data-username="${userB.name}"]`);
    await A.keyboard.press('Enter');
    await A.waitForSelector('#friend-details:not([hidden])');
    await A.keyboard.press('Enter'); // focus went to "close"
    await A.waitForSelector('#friend-details', { state: 'hidden' });
    await checkMapLabels(A, 'A');
    log('radar: B opened and closed by keyboard');

    step = 'the age ticks';
    const ageSel = `#nearby li[data-username="${userB.name}"] .age`;
    const age1 = await A.textContent(ageSel);
    await A.waitForFunction(([sel, before]) => document.querySelector(sel)?.textContent !== before, [ageSel, age1]);
    log(`age ticks: "${age1}" → "${await A.textContent(ageSel)}"`);

    // Privacy controls, each seen from the other side.
    const rowOf = (page, name) => `#friends li[data-username="${name}"]`;
    const aRowB = rowOf(A, userB.name);
    const bRowA = rowOf(B, userA.name);
    const bSeesA = `#nearby li[data-username="${userA.name}"]`;
    const theyShare = (page) => page.textContent(`${bRowA} .they-share`);

    step = 'A shares only an approximate position with B';
    await A.selectOption(`${aRowB} select[data-action="precision"]`, 'approximate');
    await B.waitForSelector(`${bSeesA}[data-approximate="true"]`);
    const approx = await B.textContent(`${bSeesA} .distance`);
    if (!/^(about \d+ km|within ~3 km)$/.test(approx)) fail(`B shows A's approximate distance as ${JSON.stringify(approx)}`);
    await B.waitForFunction((sel) => /approximately/.test(document.querySelector(sel)?.textContent ?? ''), `${bRowA} .they-share`);
    log(`B sees A as "${approx}"; B's row: "${await theyShare(B)}"`);

    step = 'A shares with B for one hour';
    await A.selectOption(`${aRowB} select[data-action="share-for"]`, '3600000');
    await A.waitForSelector(`${aRowB}:not([data-until=""])`);
    await B.waitForFunction((sel) => /until/.test(document.querySelector(sel)?.textContent ?? ''), `${bRowA} .they-share`);
    const precisionKept = await A.getAttribute(aRowB, 'data-precision');
    if (precisionKept !== 'approximate') fail(`choosing a duration changed the precision to ${precisionKept}`);
    log(`A's row: until ${await A.getAttribute(aRowB, 'data-until')}; B's row: "${await theyShare(B)}"`);
    const privacyShots = [SHOT.replace(/\.png$/, '-privacy-a.png'), SHOT.replace(/\.png$/, '-privacy-b.png')];
    await A.screenshot({ path: privacyShots[0], fullPage: true });
    await B.screenshot({ path: privacyShots[1], fullPage: true });
    log(`screenshots of the privacy controls saved to ${privacyShots.join(', ')}`);

    step = 'A shares her exact distance with B again, for good';
    await A.selectOption(`${aRowB} select[data-action="precision"]`, 'precise');
    await B.waitForSelector(`${bSeesA}[data-approximate="false"]`);
    await A.selectOption(`${aRowB} select[data-action="share-for"]`, '');
    await A.waitForSelector(`${aRowB}[data-until=""]`);
    await B.waitForFunction((sel) => document.querySelector(sel)?.textContent === 'they share with you: yes', `${bRowA} .they-share`);
    const bothWays = await A.textContent(`${aRowB} .you-share`);
    if (bothWays !== 'you share: precise') fail(`A's row for B says ${JSON.stringify(bothWays)}`);
    checkDistance('B sees A exactly again', await nearbyDistance(B, userA.name));

    step = 'A turns ghost mode on, then off';
    await A.check('#ghost');
    await A.waitForSelector('#privacy[data-ghost="true"]');
    await B.waitForSelector(bSeesA, { state: 'detached' });
    log(`ghost: B no longer sees A; A's page says "${await A.textContent('#ghost-info')}"`);
    await A.uncheck('#ghost');
    await A.waitForSelector('#privacy[data-ghost="false"]');
    checkDistance('B sees A after ghost mode', await nearbyDistance(B, userA.name));

    step = 'C, a stranger, and A opt in to strangers nearby; B does not';
    {
      const ctx = await browser.newContext({ viewport: { width: 1200, height: 860 } });
      const C = await ctx.newPage();
      C.setDefaultTimeout(WAIT_MS);
      // C's browser reaches no tile server: the page must say so and show
      // the radar view (the failed tile loads are the expected errors).
      await ctx.route(`${TILES}**`, (route) => route.abort('internetdisconnected'));
      watchPage(C, 'C', problems, (text, url) => url.startsWith(TILES) && /ERR_INTERNET_DISCONNECTED/.test(text));
      pages.C = C;
      await signUp(C, userC);
      await C.waitForSelector('#map-card[data-view="radar"][data-tiles="failed"]');
      if (!(await C.isVisible('#map')) || await C.isVisible('#geo-map')) fail('C, offline for tiles, does not show the radar');
      const note = await C.textContent('#map-note span');
      if (!note.includes(`could not load its tiles from 127.0.0.1:${TILES_PORT}`)) fail(`C's fallback note reads ${JSON.stringify(note)}`);
      await axeCheck(C, 'app, street map offline');
      log(`offline tiles: C shows the radar and says "${note}"`);
      await setLocation(C, destination(posA, 90, 3000)); // the next cell east
      await C.check('#discoverable');
      await C.waitForSelector('#strangers-card[data-discoverable="true"]');
      await A.check('#discoverable');
      await A.waitForSelector('#strangers-card[data-discoverable="true"]');
      // A sees C as an anonymous row with a band (and C sees A); B, not
      // discoverable, sees nobody, and A's friend B is no stranger.
      await A.waitForSelector('#strangers li');
      await C.waitForSelector('#strangers li');
      const row = await A.textContent('#strangers li');
      if (!/^\?Someone\d+–\d+ km (in your area|to the [a-z-]+)$/.test(row)) fail(`A's stranger row reads ${JSON.stringify(row)}`);
      if (row.includes(userC.name)) fail('the stranger row names C');
      if (await A.locator('#strangers li').count() !== 1) fail('A sees more than C');
      if (await B.locator('#strangers li').count() !== 0) fail('B, not discoverable, sees strangers');
      await A.waitForSelector('#map circle.stranger'); // A is on the radar view
      log(`strangers: A sees "${row}"; "${await A.textContent('#strangers-info')}"`);
      await A.screenshot({ path: SHOT.replace(/\.png$/, '-strangers.png'), fullPage: true });
      // C opts out: gone from A at once.
      await C.uncheck('#discoverable');
      await A.waitForSelector('#strangers li', { state: 'detached' });
      await C.waitForSelector('#strangers-card[data-discoverable="false"]');
      await A.uncheck('#discoverable');
      await A.waitForSelector('#strangers-card[data-discoverable="false"]');
      log('C opted out: A no longer sees a stranger');
      await ctx.close();
      delete pages.C;
    }

    step = 'A stops sharing with B, is told so, and shares again';
    await A.uncheck(`${aRowB} [data-action="sharing"]`);
    await A.waitForFunction((name) => [...document.querySelectorAll('.msg')]
      .some((m) => m.textContent.includes(`You no longer share your location with ${name}`)), userB.name);
    await B.waitForSelector(bSeesA, { state: 'detached' });
    await A.check(`${aRowB} [data-action="sharing"]`);
    checkDistance('B sees A when A shares again', await nearbyDistance(B, userA.name));
    log('sharing off: A was told, B no longer saw A; on again: B sees A');

    step = 'the app is accessible, on a desktop and on a phone';
    await axeCheck(A, 'app, desktop');
    await A.setViewportSize({ width: 390, height: 844 });
    await axeCheck(A, 'app, 390 × 844');
    await checkTapTargets(A, 'radar, 390 × 844');
    await A.click('#map-view'); // back to the street map
    await A.waitForSelector('#map-card[data-view="map"]');
    await axeCheck(A, 'app with the street map, 390 × 844');
    await checkTapTargets(A, 'street map, 390 × 844');
    await checkMapLabels(A, 'A on a phone');
    await A.screenshot({ path: SHOT.replace(/\.png$/, '-phone.png'), fullPage: true });
    await A.setViewportSize({ width: 1200, height: 860 });

    step = 'screenshot';
    await A.screenshot({ path: SHOT });
    log(`screenshot of A saved to ${SHOT}`);

    if (RESTART) {
      step = 'the server restarts; both pages come back by themselves';
      const sockets = { A: 0, B: 0 };
      for (const [who, page] of Object.entries(pages)) {
        await recordChanges(page);
        page.on('websocket', () => { sockets[who] += 1; });
      }
      restarting = true;
      console.log('RESTART SERVER');
      const reply = await readLine();
      if (reply.trim() !== 'restarted') fail(`the caller answered ${JSON.stringify(reply)}`);
      log('server restarted on the same address');
      for (const [who, page] of Object.entries(pages)) {
        await page.waitForFunction(() => window.__seen.states.includes('reconnecting')
          && document.querySelector('#conn-status').dataset.state === 'live', null, { timeout: 20000 });
        const seen = await page.evaluate(() => window.__seen);
        log(`${who}: states ${seen.states.join(' → ')}; ${sockets[who]} socket(s) opened; notes ${JSON.stringify(seen.notes)}`);
        if (!seen.states.includes('reconnecting')) fail(`${who} never showed "reconnecting": ${seen.states}`);
        if (seen.states.at(-1) !== 'live') fail(`${who} did not end live: ${seen.states}`);
        if (!seen.notes.some((n) => /restarting/.test(n))) fail(`${who} was not told the server is restarting`);
        if (sockets[who] < 1) fail(`${who} opened no new WebSocket`);
      }
      restarting = false;
      log(`${refused.length} handshake(s) refused while the server restarted${refused.length ? `: ${refused.join(' | ')}` : ''}`);
      // The restarted node's cache is empty: each page reports its position
      // again on the new snapshot, and each sees the other again.
      checkDistance('A sees B again', await nearbyDistance(A, userB.name));
      checkDistance('B sees A again', await nearbyDistance(B, userA.name));
    }

    step = 'B moves 20 km away';
    await setLocation(B, farB);
    await A.waitForSelector(`#nearby li[data-username="${userB.name}"]`, { state: 'detached' });
    await B.waitForSelector(`#nearby li[data-username="${userA.name}"]`, { state: 'detached' });
    await A.waitForSelector(`#geo-map .geo-friend[data-username="${userB.name}"]`, { state: 'detached' });
    log('B left both lists');

    step = 'B exports, then deletes, their history';
    await B.click('#account-tools summary');
    const download = B.waitForEvent('download');
    await B.click('#history-export');
    const file = await download;
    const geo = JSON.parse(fs.readFileSync(await file.path(), 'utf8'));
    if (geo.type !== 'FeatureCollection' || !(geo.features.length >= 2)) fail(`export: ${JSON.stringify(geo).slice(0, 200)}`);
    log(`B's history export: ${geo.features.length} points (${file.suggestedFilename()})`);
    B.once('dialog', (d) => d.accept());
    await B.click('#history-delete');
    await B.waitForFunction(() => [...document.querySelectorAll('.msg')].some((m) => /Deleted \d+ point/.test(m.textContent)));

    step = 'B deletes their account; A sees them go';
    await B.fill('#account-delete-password', userB.password);
    await B.click('#account-delete');
    await B.waitForSelector('#auth-view', { state: 'visible' });
    await A.waitForSelector(`#friends li[data-username="${userB.name}"]`, { state: 'detached' });
    log('B deleted their account: back at the login form; A\'s friend list no longer has them');

    step = 'no error shown, and no message over a control';
    for (const [who, page] of Object.entries(pages)) {
      const errs = await errorsShown(page);
      if (errs.length) fail(`${who} shows errors: ${errs.join(' | ')}`);
      await checkMessagesClear(page, who);
    }
    if (problems.length) fail(`${problems.length} problem(s): ${problems.join(" | ")}`);
    console.log(`PASS: browser client end to end (${elapsed()}s)`);
  } catch (err) {
    await reportFailure(step, err, pages, problems);
    process.exitCode = 1;
  } finally {
    await browser.close();
    tiles.close();
  }
}

// Exits explicitly: an open stdin (the caller's pipe) would keep node alive.
main().then(
  () => process.exit(process.exitCode ?? 0),
  (err) => {
    console.error(`FAIL: ${err.message}`);
    process.exit(1);
  },
);
