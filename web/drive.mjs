// Drive the page in the system's headless Chromium (playwright-core; no browser download) as a user would, for the
// tests and the benchmark. Usage: node drive.mjs PLAN.json, where the plan is
//   {"url": "...", "chromium": "/usr/bin/chromium", "timeoutMs": 120000,
//    "steps": [{"generate": {"prompt": "The ", "maxNewTokens": 32, "doSample": false, "temperature": 0.8,
//                            "topK": 40, "seed": 0, "stopAfter": 5}},
//              {"benchmark": {"contexts": [128, 8192], "steps": 16}},
//              {"screenshot": "page.png"}]}
// Prints one JSON object: {"results": [one per step], "console": [the page's errors and warnings]}.
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const plan = JSON.parse(readFileSync(process.argv[2], "utf8"));
const timeout = plan.timeoutMs ?? 120000;
const browser = await chromium.launch({
  executablePath: plan.chromium ?? "/usr/bin/chromium",
  headless: true,
  // A closed network: without these Chromium's background connections fail and slow the start.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const consoleLines = [];
try {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  page.setDefaultTimeout(timeout);
  page.on("console", (message) => {
    if (message.type() === "error" || message.type() === "warning") consoleLines.push(message.text());
  });
  page.on("pageerror", (error) => consoleLines.push(`pageerror: ${error.message}`));
  await page.goto(plan.url);
  await page.waitForFunction(() => /^(ready|error)/.test(document.getElementById("status").textContent));
  const loadStatus = await page.textContent("#status");
  if (loadStatus !== "ready") throw new Error(`the page did not load the model: ${loadStatus}`);
  const results = [];
  for (const step of plan.steps) {
    if (step.generate) {
      const g = step.generate;
      await page.fill("#prompt", g.prompt);
      await page.fill("#max-new-tokens", String(g.maxNewTokens));
      await page.setChecked("#do-sample", Boolean(g.doSample));
      for (const name of ["temperature", "topK", "seed"]) {
        if (g[name] !== undefined) await page.fill(`#${name.replace("topK", "top-k")}`, String(g[name]));
      }
      await page.click("#generate");
      if (g.stopAfter) {
        await page.waitForFunction((n) => parseInt(document.getElementById("token-count").textContent) >= n,
          g.stopAfter);
        await page.click("#stop");
      }
      await page.waitForFunction(() => /^(done|stopped|error)/.test(document.getElementById("status").textContent));
      results.push({
        status: await page.textContent("#status"),
        msPerTokenShown: await page.textContent("#ms-per-token"),
        modelInfo: await page.textContent("#model-info"),
        tokenCountShown: await page.textContent("#token-count"),
        run: await page.evaluate(() => window.minrnn.lastRun),
      });
    } else if (step.benchmark) {
      results.push(await page.evaluate((options) => window.minrnn.benchmark(options), step.benchmark));
    } else if (step.screenshot) {
      await page.screenshot({ path: step.screenshot, fullPage: true });
      results.push({ screenshot: step.screenshot });
    } else {
      throw new Error(`unknown step ${JSON.stringify(step)}`);
    }
  }
  console.log(JSON.stringify({ results, console: consoleLines }));
} catch (error) {
  console.log(JSON.stringify({ error: error.message, console: consoleLines }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
