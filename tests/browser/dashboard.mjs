// End-to-end check of the dashboard in headless Chromium, run by tests/browser.rs against a
// running stack. Usage: node dashboard.mjs BASE_URL SPEC_JSON
//   SPEC_JSON: { token, read_token (the replica asks for it on reads), expect: {wp_id: status},
//                blocked: {wp_id: text its "why" contains},
//                requeue: wp_id of a dead letter to requeue after pressing "reload routing",
//                screenshots: directory for the PNGs }
// Exits non-zero with a message on the first check that fails.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const [base, specText] = process.argv.slice(2);
const spec = JSON.parse(specText);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const step = (msg) => console.log(`browser: ${msg}`);

const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"] });
try {
  const page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
  page.on("console", (m) => { if (m.type() === "error") console.log(`page console: ${m.text()}`); });
  page.setDefaultTimeout(30_000);
  await page.goto(base);
  step("loaded the dashboard");
  if (spec.read_token) {
    // Without the token the replica answers no read, and the dashboard says what to do.
    await page.waitForSelector('#updated.err:has-text("token")');
    await page.fill("#token", spec.read_token);
    await page.dispatchEvent("#token", "change");
    step("the read token pasted");
  }

  // The plan's DAG shows each work package with the status the API has.
  for (const [wp, status] of Object.entries(spec.expect)) {
    await page.waitForSelector(`#dag g.wp[data-wp="${wp}"][data-status="${status}"]`);
  }
  step(`the DAG shows the ${Object.keys(spec.expect).length} expected statuses`);
  const lanes = await page.$$eval("#dag rect.lane", (rs) => rs.map((r) => r.dataset.lane));
  if (!lanes.includes("lane backend") || !lanes.includes("lane frontend")) throw new Error(`swimlanes missing: ${lanes}`);
  const edges = await page.$$eval("#dag path.edge", (ps) => ps.length);
  if (edges < 5) throw new Error(`expected the dependency edges to be drawn, found ${edges}`);

  // A blocked work package says what it waits for, in the DAG and in the waiting list.
  for (const [wp, text] of Object.entries(spec.blocked)) {
    const why = await page.getAttribute(`#dag g.wp[data-wp="${wp}"]`, "data-why");
    if (!why || !why.includes(text)) throw new Error(`${wp} should say it waits for ${text}, says ${why}`);
    await page.waitForSelector(`#waiting tr[data-wp="${wp}"] td.why:has-text("${text}")`);
  }
  step("blocked work packages say what they wait for");

  // The agents and replicas panels.
  await page.waitForSelector('#agents tr[data-agent="ada"] .load:has-text("/ 4")');
  await page.waitForSelector('#replicas tr[data-live="true"]');
  step("agents and replicas panels are filled");

  // The dead letter is listed with a requeue action.
  const row = `#deadletters tr[data-wp="${spec.requeue}"]`;
  await page.waitForSelector(row);
  mkdirSync(spec.screenshots, { recursive: true });
  await page.screenshot({ path: join(spec.screenshots, "dashboard.png"), fullPage: true });
  step("dead letter listed; screenshot taken");

  // Clicking the detail of a blocked work package shows its history.
  const [firstBlocked] = Object.keys(spec.blocked);
  await page.click(`#dag g.wp[data-wp="${firstBlocked}"]`);
  await page.waitForSelector(`#detail h2:has-text("${firstBlocked}")`);

  // The routing was fixed on disk: reload it from the UI, then requeue the dead letter.
  await page.fill("#token", spec.token);
  await page.dispatchEvent("#token", "change");
  await page.click("#reload");
  await page.waitForSelector('#action:has-text("/api/reload: done")');
  step("routing reloaded from the UI");
  await page.click(`${row} button.requeue`);
  await page.waitForSelector(row, { state: "detached" });
  step("dead letter requeued from the UI");
  await page.waitForSelector(`#dag g.wp[data-wp="${spec.requeue}"][data-status="completed"]`);
  step(`${spec.requeue} went through and completed`);
  await page.click(`#dag g.wp[data-wp="${spec.requeue}"]`);
  await page.waitForSelector(`#detail h2:has-text("${spec.requeue}")`);
  await page.waitForSelector('#detail td:has-text("completed")');
  await page.screenshot({ path: join(spec.screenshots, "dashboard-requeued.png"), fullPage: true });
  step("all checks passed");
} finally {
  await browser.close();
}
