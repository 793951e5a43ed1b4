// `nearby demo` in headless Chromium, the way a newcomer meets it.
//
//   node web-test/demo.mjs BASE_URL PASSWORD ARTIFACT_DIR TILES_PORT
//
// The login page says how to log in to the demo; demo logs in with the
// printed password; the walkers appear on the street map (stand-in tiles
// served here on TILES_PORT, which the demo's --tile-url names), their
// labels clear of each other; tapping one shows their details; the radar
// view shows them too; the page is axe-clean and its controls are
// tap-sized on a 390 × 844 phone. Screenshots: ARTIFACT_DIR/demo-desktop.png
// and demo-phone.png. Exits 0 on success, 1 with a message on any failure.

import {
  axeCheck, checkMapLabels, checkMessagesClear, checkTapTargets, errorsShown, fail, launch, log, elapsed,
  reportFailure, serveTiles, watchPage,
} from './lib.mjs';

const WAIT_MS = 15000;
const [BASE, PASSWORD, DIR, TILES_PORT] = process.argv.slice(2);
if (!BASE || !PASSWORD || !DIR || !TILES_PORT) {
  console.error('usage: node web-test/demo.mjs BASE_URL PASSWORD ARTIFACT_DIR TILES_PORT');
  process.exit(2);
}

let step = 'start';

async function main() {
  const tiles = await serveTiles(Number(TILES_PORT));
  const browser = await launch();
  const problems = [];
  let page;
  try {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    page = await ctx.newPage();
    page.setDefaultTimeout(WAIT_MS);
    watchPage(page, 'demo', problems);

    step = 'the login page says how to log in to the demo';
    await page.goto(BASE);
    await page.waitForSelector('#demo-hint:not([hidden])');
    const hint = (await page.textContent('#demo-hint')).replace(/\s+/g, ' ').trim();
    if (!/log in as demo with the password it printed/.test(hint)) fail(`the demo hint reads ${JSON.stringify(hint)}`);
    await axeCheck(page, 'demo login page');
    log(`login page: "${hint}"`);

    step = 'demo logs in; the walkers appear on the street map';
    await page.fill('#username', 'demo');
    await page.fill('#password', PASSWORD);
    await page.click('#login');
    await page.waitForSelector('#conn-status[data-state="live"]');
    await page.waitForSelector('#map-card[data-view="map"][data-tiles="ok"]');
    await page.waitForFunction(() => document.querySelectorAll('#geo-map .geo-friend').length >= 3, null, { timeout: 30000 });
    const where = (await page.textContent('#location-info')).trim();
    if (!/^37\.\d+, 126\.\d+ \(as the server last had it\)/.test(where)) fail(`demo's location line reads ${JSON.stringify(where)}`);
    // Let them walk a little, then look.
    await page.waitForTimeout(3000);
    const [pins, listed] = await page.evaluate(() => [
      [...document.querySelectorAll('#geo-map .geo-friend')].map((e) => e.dataset.username),
      [...document.querySelectorAll('#nearby li')].map((e) => e.dataset.username),
    ]);
    if (pins.sort().join() !== listed.sort().join()) fail(`the map shows ${pins} but the list ${listed}`);
    const labels = await checkMapLabels(page, 'demo');
    log(`street map: ${pins.length} friends (${pins.join(', ')}), ${labels.labels} labels, none overlapping (${labels.onRing} over the range ring); "${where}"`);

    step = 'tapping a walker shows their details';
    // One whose avatar no other covers (walkers may stand together).
    const first = await page.evaluate(() => [...document.querySelectorAll('#geo-map .geo-friend')].find((el) => {
      const r = el.querySelector('.pin').getBoundingClientRect();
      return document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2)?.closest('.geo-friend') === el;
    })?.dataset.username);
    if (!first) fail('every walker\'s avatar is covered by another');
    await page.click(`#geo-map .geo-friend[data-username="${first}"] .pin`);
    await page.waitForSelector('#friend-details:not([hidden])');
    const facts = await page.$$eval('#friend-details dd', (dds) => Object.fromEntries(dds.map((d) => [d.dataset.fact, d.textContent])));
    if (!/^(\d+ m|\d+\.\d+ km) to the [a-z-]+$/.test(facts.distance ?? '')) fail(`details distance ${JSON.stringify(facts)}`);
    if (!/ago \(\d/.test(facts.updated ?? '')) fail(`details updated ${JSON.stringify(facts)}`);
    if (!/^yes/.test(facts['they-share'] ?? '')) fail(`details sharing ${JSON.stringify(facts)}`);
    if (!/^precise/.test(facts['you-share'] ?? '')) fail(`details sharing ${JSON.stringify(facts)}`);
    log(`${first}: ${JSON.stringify(facts)}`);
    await page.screenshot({ path: `${DIR}/demo-desktop.png` });
    await page.click('#details-close');
    await page.waitForSelector('#friend-details', { state: 'hidden' });

    step = 'panning stops the map following; "Centre on me" brings everyone back';
    if (await page.isVisible('#map-follow')) fail('"Centre on me" shows before the map was moved');
    const bare = await page.evaluate(() => {
      const r = document.querySelector('#geo-map').getBoundingClientRect();
      for (let y = r.top + 60; y < r.bottom - 40; y += 20) {
        for (let x = r.left + 60; x < r.right - 60; x += 20) {
          const el = document.elementFromPoint(x, y);
          if (el?.closest('#geo-map') && !el.closest('.leaflet-marker-icon, .leaflet-control')) return { x, y };
        }
      }
      return null;
    });
    if (!bare) fail('no bare street to drag the map by');
    await page.mouse.move(bare.x, bare.y);
    await page.mouse.down();
    await page.mouse.move(bare.x + 150, bare.y + 100, { steps: 8 });
    await page.mouse.up();
    await page.waitForSelector('#map-follow:not([hidden])');
    const outside = () => page.evaluate(() => {
      const r = document.querySelector('#geo-map').getBoundingClientRect();
      return [...document.querySelectorAll('#geo-map .geo-friend .pin, #geo-map .geo-me span')].filter((p) => {
        const b = p.getBoundingClientRect();
        return b.right < r.left || b.left > r.right || b.bottom < r.top || b.top > r.bottom;
      }).length;
    });
    await page.click('#map-follow');
    await page.waitForSelector('#map-follow', { state: 'hidden' });
    const away = await outside();
    if (away) fail(`after "Centre on me", ${away} avatar(s) are outside the map`);
    await checkMapLabels(page, 'demo');
    log('dragged the map: "Centre on me" appeared; pressed, every avatar is back in view');

    step = 'the radar shows the same friends, labels clear';
    await page.click('#map-view');
    await page.waitForSelector('#map-card[data-view="radar"]');
    const dots = await page.$$eval('#map g.friend', (els) => els.map((e) => e.dataset.username));
    if (dots.length < 3) fail(`the radar shows ${dots}`);
    const radar = await checkMapLabels(page, 'demo');
    if (await page.isVisible('#geo-map')) fail('the street map is still shown beside the radar');
    await page.screenshot({ path: `${DIR}/demo-radar.png` });
    log(`radar: ${dots.length} friends, ${radar.labels} labels, none overlapping (${radar.onRing} over a ring)`);
    await axeCheck(page, 'demo, radar, desktop');
    // A click on the map does not move you; "Put me on the map" first.
    const before = await page.textContent('#location-info');
    const corner = await page.evaluate(() => { const r = document.querySelector('#map').getBoundingClientRect(); return { x: r.left + 12, y: r.bottom - 12 }; });
    await page.mouse.click(corner.x, corner.y);
    await page.waitForTimeout(300);
    if (!(await page.textContent('#location-info')).startsWith(before.slice(0, 20))) fail('a stray click on the radar moved demo');
    await page.click('#map-place');
    await page.mouse.click(corner.x + 150, corner.y - 150);
    await page.waitForFunction(() => /placed on the map/.test(document.querySelector('#location-info').textContent));
    if (await page.getAttribute('#map-place', 'aria-pressed') !== 'false') fail('placing stays on after one placement');
    log(`a stray click did nothing; "Put me on the map" then a click: "${(await page.textContent('#location-info')).slice(0, 60)}…"`);
    await page.click('#map-view');
    await page.waitForSelector('#map-card[data-view="map"]');
    if (await page.isVisible('#map')) fail('the radar is still shown beside the street map');
    await axeCheck(page, 'demo, street map, desktop');

    step = 'on a phone';
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForTimeout(500);
    await axeCheck(page, 'demo, street map, 390 × 844');
    await checkTapTargets(page, 'demo, 390 × 844');
    await checkMapLabels(page, 'demo on a phone');
    await page.focus(`#geo-map .geo-friend[data-username="${first}"]`);
    await page.keyboard.press('Enter'); // and by keyboard
    await page.waitForSelector('#friend-details:not([hidden])');
    await page.screenshot({ path: `${DIR}/demo-phone.png`, fullPage: false });
    log(`screenshots: ${DIR}/demo-desktop.png, ${DIR}/demo-phone.png`);

    step = 'no error shown, no message over a control, no console error';
    const errs = await errorsShown(page);
    if (errs.length) fail(`the page shows errors: ${errs.join(' | ')}`);
    await checkMessagesClear(page, 'demo');
    if (problems.length) fail(`${problems.length} problem(s): ${problems.join(' | ')}`);
    console.log(`PASS: the demo in Chromium (${elapsed()}s)`);
  } catch (err) {
    await reportFailure(step, err, page ? { demo: page } : {}, problems, () => `${DIR}/demo-failed.png`);
    process.exitCode = 1;
  } finally {
    await browser.close();
    tiles.close();
  }
}

main().then(() => process.exit(process.exitCode ?? 0), (err) => {
  console.error(`FAIL: ${err.message}`);
  process.exit(1);
});
