// What the browser tests share: Chromium, a stand-in tile server, and the
// checks every page must pass (axe-core, tap targets, messages clear of
// controls, map labels clear of each other).

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const AXE_PATH = require.resolve('axe-core/axe.min.js');
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

const t0 = Date.now();
export function log(msg) { console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}`); }
export function fail(msg) { throw new Error(msg); }
export const elapsed = () => ((Date.now() - t0) / 1000).toFixed(1);

export function launch() {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}

// The page embeds Leaflet from npm (scripts/vendor-web): the copies in the
// binary must be the pinned package's files, byte for byte.
export function checkVendoredLeaflet() {
  const pkg = path.join(ROOT, 'web-test/node_modules/leaflet');
  const version = JSON.parse(fs.readFileSync(path.join(pkg, 'package.json'), 'utf8')).version;
  for (const [from, to] of [['dist/leaflet.js', 'leaflet.js'], ['dist/leaflet.css', 'leaflet.css'], ['LICENSE', 'LICENSE']]) {
    const a = fs.readFileSync(path.join(pkg, from));
    const b = fs.readFileSync(path.join(ROOT, 'crates/nearby-server/web/vendor/leaflet', to));
    if (!a.equals(b)) fail(`web/vendor/leaflet/${to} is not npm's leaflet ${version} ${from}: run scripts/vendor-web`);
  }
  log(`the embedded Leaflet is npm's leaflet ${version}`);
}

// A stand-in for a street-map tile server (this test runs offline): SVG
// tiles with a few made-up streets and a park, the same for the same tile.
export function serveTiles(port) {
  const server = http.createServer((req, res) => {
    const m = /^\/(\d+)\/(\d+)\/(\d+)\.svg$/.exec(req.url);
    if (!m) { res.writeHead(404).end(); return; }
    let seed = (Number(m[1]) * 73856093) ^ (Number(m[2]) * 19349663) ^ (Number(m[3]) * 83492791);
    const rnd = () => { seed = (Math.imul(seed, 1103515245) + 12345) >>> 0; return seed / 2 ** 32; };
    const roads = [];
    for (let i = 0; i < 3; i++) {
      const a = Math.round(20 + rnd() * 216);
      const b = Math.round(20 + rnd() * 216);
      roads.push(`<path d="M${a} 0L${b} 256" /><path d="M0 ${b}L256 ${a}" />`);
    }
    const px = Math.round(rnd() * 150);
    const py = Math.round(rnd() * 150);
    const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256" viewBox="0 0 256 256">`
      + '<rect width="256" height="256" fill="#f2efe9"/>'
      + `<rect x="${px}" y="${py}" width="70" height="50" rx="6" fill="#cdebb0"/>`
      + `<g stroke="#d6d0c4" stroke-width="9" fill="none">${roads.join('')}</g>`
      + `<g stroke="#ffffff" stroke-width="6" fill="none">${roads.join('')}</g></svg>`;
    res.writeHead(200, { 'Content-Type': 'image/svg+xml', 'Cache-Control': 'max-age=3600' }).end(svg);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

// Console errors are problems, except those `expected(text, url)` allows
// (e.g. tiles a test blocks on purpose).
export function watchPage(page, who, problems, expected = () => false) {
  page.on('pageerror', (err) => problems.push(`${who} page error: ${err.message}`));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    if (!expected(m.text(), m.location()?.url ?? '')) problems.push(`${who} console: ${m.text()}`);
  });
}

// axe-core on the page as it is now: no serious or critical violation.
export async function axeCheck(page, label) {
  await page.addScriptTag({ path: AXE_PATH });
  const res = await page.evaluate(() => window.axe.run(document, { resultTypes: ['violations'] }));
  const bad = res.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  if (bad.length) {
    fail(`axe (${label}): ${bad.map((v) => `${v.id} [${v.impact}] ${v.help}: ${v.nodes.slice(0, 4).map((n) => n.target.join(' ')).join(', ')}`).join(' | ')}`);
  }
  log(`axe (${label}): no serious or critical violation (${res.violations.length} lesser)`);
}

// Each visible control (a checkbox: its label) is at least 44 × 44 px.
export async function checkTapTargets(page, label) {
  const small = await page.evaluate(() => [...document.querySelectorAll('button, select, input, summary, [role="button"], .leaflet-control a')]
    .filter((el) => el.checkVisibility() && !el.closest('.leaflet-control-attribution'))
    .map((el) => {
      const target = el.type === 'checkbox' ? el.closest('label') ?? el : el;
      const r = target.getBoundingClientRect();
      return { what: el.id || el.dataset.action || el.getAttribute('aria-label') || el.textContent.trim() || el.tagName, w: r.width, h: r.height };
    })
    .filter((t) => t.w < 44 || t.h < 44));
  if (small.length) fail(`tap targets under 44 px (${label}): ${JSON.stringify(small)}`);
}

export async function errorsShown(page) {
  return page.$$eval('#messages .msg.error, .card-notes .msg.error, .field-problem:not([hidden])', (els) => els.map((e) => e.textContent.replace(/×$/, '').trim()));
}

// No message box lies over a control.
export async function checkMessagesClear(page, who) {
  const covered = await page.evaluate(() => {
    const boxes = [...document.querySelectorAll('#messages .msg, .card-notes .msg')].map((m) => m.getBoundingClientRect());
    return [...document.querySelectorAll('button, input, select, summary, a')]
      .filter((el) => el.offsetParent !== null && !el.closest('#messages, .card-notes'))
      .filter((el) => {
        const r = el.getBoundingClientRect();
        return boxes.some((b) => r.left < b.right && b.left < r.right && r.top < b.bottom && b.top < r.bottom);
      })
      .map((el) => el.id || el.textContent.trim());
  });
  if (covered.length) fail(`${who}: messages cover ${covered.join(', ')}`);
}

// The labels on the map as drawn: none overlaps another, a friend's dot or
// a map control (street map) or a ring caption, "you" or the compass
// (radar). A ring may pass under a label only where no spot clear of it
// was left, and then behind an opaque background, never through the text.
// Returns how many labels it checked and how many sit on a ring.
export async function checkMapLabels(page, who) {
  const found = await page.evaluate(() => {
    const rect = (el) => { const r = el.getBoundingClientRect(); return { x0: r.left, y0: r.top, x1: r.right, y1: r.bottom }; };
    const hit = (a, b) => a.x0 < b.x1 - 0.5 && b.x0 < a.x1 - 0.5 && a.y0 < b.y1 - 0.5 && b.y0 < a.y1 - 0.5;
    const near = (b, cx, cy) => Math.hypot(Math.max(b.x0 - cx, 0, cx - b.x1), Math.max(b.y0 - cy, 0, cy - b.y1));
    const far = (b, cx, cy) => Math.hypot(Math.max(Math.abs(b.x0 - cx), Math.abs(b.x1 - cx)), Math.max(Math.abs(b.y0 - cy), Math.abs(b.y1 - cy)));
    const centre = (el) => { const r = el.getBoundingClientRect(); return { x: (r.left + r.right) / 2, y: (r.top + r.bottom) / 2, r: r.width / 2 }; };
    const opaque = (el) => {
      const style = getComputedStyle(el);
      const fill = el instanceof SVGElement ? style.fill : style.backgroundColor;
      const alpha = /rgba?\(([^)]*)\)/.exec(fill)?.[1].split(',')[3];
      return fill !== 'none' && (alpha === undefined || Number(alpha) >= 0.99) && Number(style.fillOpacity ?? 1) >= 0.99;
    };
    const street = document.querySelector('#map-card').dataset.view === 'map';
    let els; let dots; let fixed; let rings;
    const ownDot = (el) => centre(el.closest('.geo-friend, g.friend').querySelector('.pin, circle.dot'));
    // A label joined to its dot by a leader line is its dot's whatever is near.
    const joined = (el) => Boolean(el.closest('.geo-friend, g.friend').querySelector('.leader:not([hidden])'));
    if (street) {
      els = [...document.querySelectorAll('#geo-map .pin-label:not([hidden])')];
      dots = [...document.querySelectorAll('#geo-map .geo-friend .pin')].map(centre);
      fixed = [...document.querySelectorAll('#geo-map .leaflet-control, #geo-map .geo-me span')].map(rect);
      rings = [...document.querySelectorAll('#geo-map path.range-ring')].map((p) => centre(p));
    } else {
      els = [...document.querySelectorAll('#map .label-bg')];
      dots = [...document.querySelectorAll('#map circle.dot, #map circle.me, #map circle.stranger')].map(centre);
      fixed = [...document.querySelectorAll('#map .ring-label, #map .me-label, #map .compass')].map(rect);
      rings = [...document.querySelectorAll('#map circle.ring')].map(centre);
    }
    const labels = els.map(rect);
    const problems = [];
    // No avatar covers you.
    if (street) {
      const me = document.querySelector('#geo-map .geo-me span');
      if (me) dots.forEach((d, j) => { if (near(rect(me), d.x, d.y) < d.r - 1) problems.push(`avatar ${j} covers "you"`); });
    }
    // A ring's caption is not under a friend's dot either.
    if (!street) {
      const captions = [...document.querySelectorAll('#map .ring-label')].map(rect);
      const friendDots = [...document.querySelectorAll('#map circle.dot')].map(centre);
      captions.forEach((c, i) => friendDots.forEach((d, j) => { if (near(c, d.x, d.y) < d.r - 1) problems.push(`ring caption ${i} is under dot ${j}`); }));
    }
    let onRing = 0;
    labels.forEach((b, i) => {
      labels.forEach((o, j) => { if (j > i && hit(b, o)) problems.push(`label ${i} overlaps label ${j}`); });
      fixed.forEach((o, j) => { if (hit(b, o)) problems.push(`label ${i} overlaps fixed item ${j}`); });
      dots.forEach((d, j) => { if (near(b, d.x, d.y) < d.r - 1) problems.push(`label ${i} overlaps dot ${j}`); });
      const own = ownDot(els[i]);
      const mine = near(b, own.x, own.y);
      if (joined(els[i])) {
        // Its leader line (dot to label centre) runs through no other label.
        const cx = (b.x0 + b.x1) / 2;
        const cy = (b.y0 + b.y1) / 2;
        labels.forEach((o, j) => {
          if (j === i) return;
          const inner = { x0: o.x0 + 1, y0: o.y0 + 1, x1: o.x1 - 1, y1: o.y1 - 1 };
          for (let t = 0; t <= 1; t += 0.02) {
            const x = own.x + (cx - own.x) * t;
            const y = own.y + (cy - own.y) * t;
            if (x > inner.x0 && x < inner.x1 && y > inner.y0 && y < inner.y1) { problems.push(`label ${i}'s leader crosses label ${j}`); break; }
          }
        });
      }
      if (!joined(els[i])) dots.forEach((d, j) => {
        if (Math.hypot(d.x - own.x, d.y - own.y) > 1 && near(b, d.x, d.y) < mine - 1) problems.push(`label ${i} is nearer dot ${j} than its own`);
      });
      if (rings.some((r) => near(b, r.x, r.y) < r.r - 1 && r.r + 1 < far(b, r.x, r.y))) {
        onRing += 1;
        if (!opaque(els[i])) problems.push(`label ${i} lets a ring through its text`);
      }
    });
    return { problems, labels: labels.length, onRing, view: street ? 'street map' : 'radar' };
  });
  if (found.problems.length) fail(`${who}'s ${found.view}: ${found.problems.join('; ')}`);
  return found;
}

// placeLabels itself, on random crowded scenes: whatever it places never
// overlaps another label, a dot or a fixed box, and stays in bounds.
export async function checkPlaceLabels() {
  const { placeLabels, conflicts } = await import(path.join(ROOT, 'crates/nearby-server/web/labels.js'));
  let seed = 42;
  const rnd = () => { seed = (Math.imul(seed, 1103515245) + 12345) >>> 0; return seed / 2 ** 32; };
  let placedTotal = 0; let total = 0; let crossings = 0; let shortTotal = 0;
  for (let scene = 0; scene < 300; scene++) {
    const n = 1 + Math.floor(rnd() * 25);
    const spread = 20 + rnd() * 180;
    const items = Array.from({ length: n }, () => ({
      x: (rnd() - 0.5) * spread, y: (rnd() - 0.5) * spread, r: 8, w: 60 + rnd() * 60, h: 15,
      short: rnd() < 0.8 ? { w: 20 + rnd() * 40 } : undefined,
    }));
    const s = {
      dots: items.map(({ x, y, r }) => ({ x, y, r })),
      boxes: [{ x0: -10, y0: -200, x1: 10, y1: -180 }],
      rings: [{ cx: 0, cy: 0, r: 60 }, { cx: 0, cy: 0, r: 150 }],
      bounds: { x0: -200, y0: -200, x1: 200, y1: 200 },
    };
    const spots = placeLabels(items, s);
    // Each label's leader (label i's, or none), as drawn: dot to label centre.
    const leaders = spots.map((p, i) => (p?.leader ? [items[i].x, items[i].y, p.x, p.y] : [0, 0, 0, 0]));
    const hard = conflicts(spots.map((p) => p?.box ?? null), { ...s, rings: [], leaders: leaders.map((l) => (l[0] === l[2] && l[1] === l[3] ? [1e9, 1e9, 1e9, 1e9] : l)) }, items.map((it, i) => (spots[i]?.leader ? null : it)));
    if (hard.length) fail(`placeLabels, scene ${scene} (${n} labels): ${hard.join('; ')}`);
    crossings += conflicts(spots.map((p) => p?.box ?? null), { rings: s.rings }).length;
    placedTotal += spots.filter(Boolean).length;
    shortTotal += spots.filter((p) => p?.short).length;
    spots.forEach((p, i) => {
      const want = p?.short ? items[i].short.w : items[i].w;
      if (p && Math.abs(p.box.x1 - p.box.x0 - want) > 1e-9) fail(`placeLabels gave label ${i} of scene ${scene} a box of the wrong width`);
    });
    total += n;
    // Alone, a label always finds a place beside its dot.
    if (n === 1 && (!spots[0] || Math.hypot(spots[0].x - items[0].x, spots[0].y - items[0].y) > Math.hypot(items[0].r + 3 + items[0].w / 2, items[0].r + 3 + 7.5) + 1)) fail(`placeLabels left a lone label out or away from its dot (scene ${scene})`);
  }
  log(`placeLabels: 300 random scenes, ${placedTotal}/${total} labels placed (${shortTotal} by name only), none overlapping; ${crossings} over a ring`);
}

// Says where and why a walk failed: the step, the error's first line (and
// what it was waiting for), each page's connection and messages (and a
// screenshot of it, given a path), and the problems collected.
export async function reportFailure(step, err, pages, problems, shotOf = () => null) {
  const lines = err.message.replace(/\x1b\[[0-9;]*m/g, '').split('\n');
  const waiting = lines.find((l) => /waiting for/.test(l));
  console.error(`FAIL at step "${step}": ${lines[0]}${waiting ? `\n  ${waiting.trim()}` : ''}`);
  for (const [who, page] of Object.entries(pages)) {
    try {
      const conn = await page.textContent('#conn-status', { timeout: 1000 });
      const msgs = await page.$$eval('.msg', (els) => els.map((e) => e.textContent.trim()));
      console.error(`  ${who}: connection "${conn}", messages: ${JSON.stringify(msgs)}`);
      const shot = shotOf(who);
      if (shot) await page.screenshot({ path: shot });
    } catch { /* page gone */ }
  }
  for (const p of problems) console.error(`  ${p}`);
}
