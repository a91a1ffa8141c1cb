// Drives the web console in headless Chromium for tests/admin.rs: reads what the page shows,
// inspects a dead event, tries a replay with a wrong token and then the right one, and prints
// what it saw as one JSON line. Usage: node drive.cjs URL TOKEN DEAD_ID SCREENSHOT_PREFIX
// (playwright-core is found through NODE_PATH; the browser is Debian's /usr/bin/chromium).
"use strict";
const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");

const [url, token, deadId, shots] = process.argv.slice(2);
const STEP = { timeout: 20000 };

(async () => {
  const profile = fs.mkdtempSync(path.join(require("os").tmpdir(), "outbox-console-"));
  // A fresh profile directory per run (playwright passes it as --user-data-dir).
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.OUTBOX_TEST_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run"],
  });
  const seen = {};
  try {
    const page = await browser.newPage();
    page.on("dialog", (d) => d.accept());
    await page.goto(url);
    const row = `#dead-list tr[data-id="${deadId}"]`;
    await page.waitForSelector(row, STEP);
    // Two refreshes, so that the rate and the chart have something to work with.
    await page.waitForFunction(() => document.querySelectorAll("#chart polyline")[0]?.getAttribute("points").split(" ").length >= 2, null, STEP);
    const read = (id) => page.$eval(`#${id}`, (el) => el.textContent.trim());
    for (const id of ["ready", "pending", "dead", "keys-blocked", "oldest", "rate"]) seen[id] = await read(id);
    seen.destinations = await page.$$eval("#destinations tr", (rows) => rows.map((r) => Array.from(r.children, (c) => c.textContent.trim())));
    seen.deadRow = await page.$eval(row, (r) => Array.from(r.children, (c) => c.textContent.trim()));
    await page.click(row);
    await page.waitForSelector("#detail:not([hidden])", STEP);
    seen.detailPayload = JSON.parse(await read("detail-payload"));
    seen.detailError = await read("detail-error");
    await page.screenshot({ path: `${shots}-before-replay.png`, fullPage: true });
    await page.fill("#token", "not-the-token-at-all");
    await page.click("#replay");
    await page.waitForFunction(() => document.getElementById("message").textContent.includes("refused"), null, STEP);
    seen.wrongToken = await read("message");
    await page.fill("#token", token);
    await page.click("#replay");
    await page.waitForFunction(() => document.getElementById("message").textContent.startsWith("replay:"), null, STEP);
    seen.replayed = await read("message");
    await page.waitForFunction((sel) => !document.querySelector(sel) && document.getElementById("dead").textContent.trim() === "0", row, STEP);
    seen.deadAfter = await read("dead");
    seen.deadListAfter = await page.$eval("#dead-list", (t) => t.textContent.trim());
    await page.screenshot({ path: `${shots}-after-replay.png`, fullPage: true });
  } catch (e) {
    seen.error = String(e && e.stack || e);
  } finally {
    await browser.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  console.log(JSON.stringify(seen));
})();
