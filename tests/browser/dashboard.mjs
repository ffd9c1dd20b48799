// End-to-end check of the dashboard in headless Chromium, run by tests/browser.rs against a
// running stack. Usage: node dashboard.mjs BASE_URL SPEC_JSON
//   SPEC_JSON: { token, read_token (the replica asks for it on reads), expect: {wp_id: status},
//                blocked: {wp_id: text its "why" contains},
//                requeue: wp_id of a dead letter to requeue after pressing "reload routing",
//                screenshots: directory for the PNGs,
//                big: { plan, lanes: [{lane, done, total}], frontier: [wp_id], failed: wp_id,
//                       pause_lane, after_pause: the wp_id that must wait while its lane is paused,
//                       pause_agent, shared: directory where release-LANE lets the lane's
//                       running step complete },
//                spend: { plan, agent: one that reported usage, budget: USD to set for the plan
//                         from the page, below what it spent },
//                approve: { wp, by, comment } (v1.6): approved from the page,
//                progress: { wp, text } (v1.6): a running step's progress, shown live }
// Exits non-zero with a message on the first check that fails.
import { chromium } from "playwright-core";
import { mkdirSync, writeFileSync } from "node:fs";
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

  // The newest plan is the big one; the sample plan is chosen by name.
  await page.waitForSelector('#plan option[value="e2e"]', { state: "attached" });
  await page.selectOption("#plan", "e2e");

  // The plan's DAG shows each work package with the status the API has: in a box of its own,
  // or, finished, in a folded stretch of its lane.
  for (const [wp, status] of Object.entries(spec.expect)) {
    const own = `#dag g.wp[data-wp="${wp}"][data-status="${status}"]`;
    await page.waitForSelector(status === "completed" ? `${own}, #dag g.group[data-group="done"][data-members~="${wp}"]` : own);
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

  // Before the budget below what e2e spent, which would hold the rerun.
  await rerunFromPage(page, spec.ops);
  if (spec.spend) await spendAndBudgets(page, spec.spend);
  if (spec.approve) await approve(page, spec);
  await bigPlan(page, spec.big);
  await cancelFromPage(page, spec.ops);
  if (spec.schedules) await schedules(page, spec.schedules);
  step("all checks passed");
} finally {
  await browser.close();
}

/** (v1.6) A step waiting for an approval is listed with its buttons and approved from the page,
 *  with a comment and a name; a running step's progress is shown live. */
async function approve(page, spec) {
  const row = `#approvals tr[data-wp="${spec.approve.wp}"]`;
  await page.waitForSelector(`${row}[data-wait="approval"]`);
  await page.waitForSelector(`#progress tr[data-wp="${spec.progress.wp}"] td.progress:has-text("${spec.progress.text}")`);
  step(`${spec.approve.wp} waits for an approval; ${spec.progress.wp}'s progress shown live`);
  await page.fill("#decision-by", spec.approve.by);
  await page.dispatchEvent("#decision-by", "change");
  await page.fill(`${row} input.comment`, spec.approve.comment);
  mkdirSync(spec.screenshots, { recursive: true });
  await page.screenshot({ path: join(spec.screenshots, "dashboard-approval.png"), fullPage: true });
  await page.click(`${row} button.approve`);
  await page.waitForSelector(row, { state: "detached" });
  await page.waitForSelector('#action:has-text("approve: done")');
  step(`${spec.approve.wp} approved from the page`);
}

/** The big plan: the view opens on the frontier, folds what is finished, shows each lane's
 *  progress and sums up what waits; a lane and an agent are paused and resumed from the page. */
async function bigPlan(page, big) {
  await page.selectOption("#plan", big.plan);
  await page.evaluate(() => window.scrollTo(0, 0));
  for (const wp of big.frontier) await page.waitForSelector(`#dag g.wp[data-wp="${wp}"]:not(.group)`);
  const view = page.viewportSize();
  for (const wp of big.frontier) {
    const box = await page.locator(`#dag g.wp[data-wp="${wp}"]`).boundingBox();
    const inView = box && box.x >= 0 && box.y >= 0 && box.x + box.width <= view.width && box.y + box.height <= view.height;
    if (!inView) throw new Error(`${wp}, where its lane is now, is outside the view without scrolling: ${JSON.stringify(box)} in ${JSON.stringify(view)}`);
    const visible = await page.evaluate((id) => {
      const g = document.querySelector(`#dag g.wp[data-wp="${id}"]`).getBoundingClientRect();
      const s = document.querySelector("#dag .dagscroll").getBoundingClientRect();
      return g.left >= s.left && g.right <= s.right;
    }, wp);
    if (!visible) throw new Error(`${wp} is scrolled out of the plan's view`);
  }
  step(`the ${big.frontier.length} lanes' frontier is in view without scrolling`);

  // Finished stretches are one box each: no finished step of the plan has a box of its own
  // when three or more of its lane's are done in a row.
  for (const l of big.lanes.filter((x) => x.done >= 3)) {
    const group = `#dag g.group[data-group="done"][data-members~="big.${l.lane}-s00"]`;
    await page.waitForSelector(group);
    const count = Number(await page.getAttribute(group, "data-count"));
    if (count !== l.done) throw new Error(`lane ${l.lane}: the folded stretch holds ${count} steps, ${l.done} are done`);
    if (await page.$(`#dag g.wp:not(.group)[data-wp="big.${l.lane}-s00"]`)) throw new Error(`lane ${l.lane}: a finished step is drawn on its own`);
  }
  const boxes = await page.$$eval("#dag g.wp", (gs) => gs.length);
  if (boxes > 6 * big.lanes.length) throw new Error(`${boxes} boxes for ${big.lanes.length} lanes: the plan is not folded`);
  step(`finished stretches folded (${boxes} boxes for ${big.lanes.length * big.lanes[0].total} steps)`);

  // Each lane's progress, in the plan and in the lanes table.
  for (const l of big.lanes) {
    await page.waitForSelector(`#dag g.progress[data-lane="${l.lane}"][data-done="${l.done}"][data-total="${l.total}"]`);
    await page.waitForSelector(`#lanes tr[data-lane="${l.lane}"][data-done="${l.done}"][data-total="${l.total}"]`);
  }
  step("per-lane progress shown");

  // What waits is summed up: the failed step on its own line, each lane's queue on one.
  await page.waitForSelector(`#waiting tr[data-wp="${big.failed}"] td.why:has-text("failed")`);
  for (const l of big.lanes.filter((x) => x.done < x.total - 1)) {
    const waiting = l.total - l.done - 1;
    const row = `#waiting tr[data-group="lane:${l.lane}"]`;
    await page.waitForSelector(`${row}[data-count="${waiting}"] td.why:has-text("head")`);
  }
  const rows = await page.$$eval("#waiting tbody tr", (rs) => rs.length);
  if (rows > big.lanes.length + 1) throw new Error(`the waiting list has ${rows} rows for ${big.lanes.length} lanes`);
  step(`the waiting list sums up the blocked steps in ${rows} rows`);

  // The activity chart has the minutes' dispatches.
  await page.waitForFunction(() => Number(document.querySelector("#activity [data-dispatched]")?.dataset.dispatched) > 0, null, { timeout: 15_000 });
  const done = big.lanes.reduce((n, l) => n + l.done, 0);
  const completed = Number(await page.getAttribute("#activity [data-completed]", "data-completed"));
  if (completed < done) throw new Error(`the activity chart counts ${completed} completions, the plan has ${done}`);
  await page.waitForSelector("#activity svg.throughput polyline.dispatched");
  await page.waitForSelector("#activity svg.latency :is(polyline, circle).p50");
  mkdirSync(spec.screenshots, { recursive: true });
  await page.screenshot({ path: join(spec.screenshots, "dashboard-big-plan.png"), fullPage: true });
  step("activity chart drawn; big-plan screenshot taken");

  // Pause a lane from its row; its running step finishes, the next one waits, paused.
  await page.fill("#pause-reason", "maintenance window");
  await page.click(`#lanes tr[data-lane="${big.pause_lane}"] button.pause`);
  await page.waitForSelector(`#pauses tr[data-scope="lane"][data-name="${big.pause_lane}"]:has-text("maintenance window")`);
  await page.waitForSelector(`#lanes tr[data-lane="${big.pause_lane}"] button.resume`);
  writeFileSync(join(big.shared, `release-${big.pause_lane}`), "");
  const after = `#dag g.wp[data-wp="${big.after_pause}"]`;
  await page.waitForFunction((sel) => (document.querySelector(sel)?.dataset.why || "").startsWith("paused"), after);
  if ((await page.getAttribute(after, "data-status")) === "dispatched") throw new Error(`${big.after_pause} went while its lane was paused`);
  await page.waitForSelector(`#waiting tr:has(td.why:text-matches("^paused"))`);
  await page.screenshot({ path: join(spec.screenshots, "dashboard-paused.png"), fullPage: true });
  step(`lane ${big.pause_lane} paused from the page: ${big.after_pause} waits, paused; screenshot taken`);
  await page.click(`#lanes tr[data-lane="${big.pause_lane}"] button.resume`);
  await page.waitForSelector(`${after}[data-status="dispatched"]`);
  await page.waitForSelector(`#pauses tr[data-name="${big.pause_lane}"]`, { state: "detached" });
  step(`lane ${big.pause_lane} resumed from the page: ${big.after_pause} went`);

  // An agent, from its row, resumed from the pauses list.
  await page.click(`#agents tr[data-agent="${big.pause_agent}"] button.pause`);
  await page.waitForSelector(`#agents tr[data-agent="${big.pause_agent}"][data-paused="true"]`);
  await page.click(`#pauses tr[data-scope="agent"][data-name="${big.pause_agent}"] button.resume`);
  await page.waitForSelector(`#agents tr[data-agent="${big.pause_agent}"][data-paused="false"] button.pause`);
  step(`agent ${big.pause_agent} paused and resumed from the page`);

  // The plan shown, from the button beside the plan selector.
  await page.click("#pause-plan");
  await page.waitForSelector(`#pauses tr[data-scope="plan"][data-name="${big.plan}"]`);
  await page.waitForSelector('#pause-plan[data-paused="true"]:has-text("resume plan")');
  await page.click("#pause-plan");
  await page.waitForSelector(`#pauses tr[data-scope="plan"][data-name="${big.plan}"]`, { state: "detached" });
  await page.waitForSelector('#pause-plan[data-paused="false"]:has-text("pause plan")');
  step(`plan ${big.plan} paused and resumed from the page`);
}

/** (v1.6) Cancel a running step from its detail: it ends cancelled, and its lane goes on. */
async function cancelFromPage(page, ops) {
  await page.selectOption("#plan", ops.cancel_plan);
  await page.click(`#dag g.wp[data-wp="${ops.cancel}"]`);
  await page.waitForSelector(`#detail h2:has-text("${ops.cancel}")`);
  await page.click('#detail button[data-act="cancel"]');
  await page.waitForSelector(`#action:has-text("/api/work-packages/${ops.cancel}/cancel: done")`);
  // Finished, it may fold into its lane's stretch of finished steps.
  const own = `#dag g.wp[data-wp="${ops.cancel}"][data-status="cancelled"]`;
  await page.waitForSelector(`${own}, #dag g.group[data-group="done"][data-members~="${ops.cancel}"]`);
  await page.waitForSelector('#detail td:has-text("while running")');
  await page.waitForSelector(`#dag g.wp[data-wp="${ops.next}"][data-status="dispatched"]`);
  await page.screenshot({ path: join(ops.screenshots, "dashboard-cancelled.png"), fullPage: true });
  step(`${ops.cancel} cancelled while running; ${ops.next}, next in its lane, went; screenshot taken`);
}

/** (v1.6) Rerun a completed work package from its detail: it runs again as a new attempt, its
 *  earlier run kept in its history. */
async function rerunFromPage(page, ops) {
  await page.selectOption("#plan", ops.rerun_plan);
  await page.click(`#dag g.wp[data-wp="${ops.rerun}"]`);
  await page.waitForSelector(`#detail h2:has-text("${ops.rerun}")`);
  await page.click('#detail button[data-act="rerun"]');
  await page.waitForSelector('#detail td:has-text("rerun by an operator")');
  await page.waitForFunction(
    () => [...document.querySelectorAll("#detail tbody tr")].filter((r) => r.children[1]?.textContent.trim() === "completed").length >= 2,
  );
  await page.screenshot({ path: join(ops.screenshots, "dashboard-rerun.png"), fullPage: true });
  step(`${ops.rerun} rerun from the page: completed again, both runs in its history; screenshot taken`);
}

/** The schedules section (v1.6): each schedule with its next firing, a paused one as paused;
 *  pause and resume one from its row. */
async function schedules(page, sch) {
  const row = `#schedules tr[data-schedule="${sch.name}"]`;
  await page.waitForSelector(`${row}[data-paused="false"] td.next:has-text("UTC")`);
  await page.waitForSelector(`#schedules tr[data-schedule="${sch.paused}"][data-paused="true"] td.next:has-text("paused")`);
  const next = await page.textContent(`${row} td.next`);
  if (!next.startsWith(sch.next)) throw new Error(`${sch.name}: next firing ${next}, expected ${sch.next}`);
  await page.locator("#schedules-section").screenshot({ path: join(sch.screenshots, "dashboard-schedules.png") });
  step(`schedules listed with their next firing (${next.trim()}); screenshot taken`);
  await page.click(`${row} button.schedule-toggle`);
  await page.waitForSelector(`${row}[data-paused="true"] td.next:has-text("paused")`);
  await page.click(`${row} button.schedule-toggle`);
  await page.waitForSelector(`${row}[data-paused="false"] td.next:has-text("UTC")`);
  step(`schedule ${sch.name} paused and resumed from the page`);
}

/** (v1.6) Spend per agent and plan, and a plan's budget set from the page: below what the plan
 *  spent, it shows as reached. */
async function spendAndBudgets(page, sp) {
  const nonZero = async (sel) => {
    await page.waitForFunction((s) => Number(document.querySelector(s)?.textContent) > 0, sel);
    return page.textContent(sel);
  };
  const planSpent = await nonZero(`#spend-plans tr[data-name="${sp.plan}"] td.cost`);
  await nonZero(`#spend-agents tr[data-name="${sp.agent}"] td.cost`);
  if (!/^\d+\.\d{2,}$/.test(planSpent)) throw new Error(`plan ${sp.plan} spent ${planSpent}: not an exact amount`);
  step(`spend shown: plan ${sp.plan} ${planSpent} USD`);
  await page.fill("#budget-plan", sp.plan);
  await page.fill("#budget-usd", sp.budget);
  await page.click("#budget-set");
  const row = `#budgets tr.budget[data-scope="plan"][data-name="${sp.plan}"]`;
  await page.waitForSelector(`${row} .pill:has-text("reached")`);
  // The budget's spend is the plan's, to the cent (read in one refresh of the panel).
  await page.waitForFunction(([r, p]) => {
    const a = document.querySelector(`${r} td.spent`)?.textContent, b = document.querySelector(`#spend-plans tr[data-name="${p}"] td.cost`)?.textContent;
    return a && a === b;
  }, [row, sp.plan]);
  const spent = await page.textContent(`${row} td.spent`);
  await page.locator("#spend").scrollIntoViewIfNeeded();
  await page.locator("#spend").screenshot({ path: join(spec.screenshots, "dashboard-spend.png") });
  step(`budget of plan ${sp.plan} set from the page to ${sp.budget}: reached at ${spent}; screenshot taken`);
}
