// Drives the dashboard in Debian's headless Chromium against a real harnessd:
// opens the one-time login link, waits for the live table, clicks stop on a service,
// sees its state change in the page, and saves a screenshot.
//
// Env: LOGIN_URL (from `harness ui`), CA_PEM (the daemon's CA), SERVICE (stack/name to
// stop), SCREENSHOT (where to save the PNG). Chromium trusts the daemon through the
// CA's key pin (--ignore-certificate-errors-spki-list), not by ignoring errors.
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const { LOGIN_URL, CA_PEM, SERVICE, SCREENSHOT } = process.env;
const ca = new crypto.X509Certificate(fs.readFileSync(CA_PEM));
const pin = crypto
  .createHash("sha256")
  .update(ca.publicKey.export({ type: "spki", format: "der" }))
  .digest("base64");
const profile = fs.mkdtempSync(path.join(os.tmpdir(), "harness-chromium-"));

// A fresh profile: Chromium honours the key pin only with its own user data dir.
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1100, height: 520 },
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    `--ignore-certificate-errors-spki-list=${pin}`,
  ],
});
try {
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error("page error:", e.message));
  // Chromium aborts a navigation when the machine's interfaces change (other tests
  // make and remove container networks); the code is spent only by the page's script,
  // so loading again is safe.
  for (let attempt = 1; ; attempt++) {
    try {
      await page.goto(LOGIN_URL);
      break;
    } catch (e) {
      if (attempt >= 5 || !String(e.message).includes("ERR_NETWORK_CHANGED")) throw e;
      await new Promise((r) => setTimeout(r, 500));
    }
  }
  await page.waitForSelector("#status.online", { timeout: 20000 });
  const row = page.locator(`tr[data-service="${SERVICE}"]`);
  await row.locator("td.state-running").waitFor({ timeout: 20000 });
  // The log panel follows the service's output.
  await row.locator("td.name").click();
  await page.waitForFunction(() => document.getElementById("log").textContent.length > 0, null, { timeout: 20000 });
  await row.locator('button[data-action="stop"]').click();
  await row.locator("td.state-stopped").waitFor({ timeout: 20000 });
  await page.screenshot({ path: SCREENSHOT });
  console.log(`stopped ${SERVICE} from the page; screenshot in ${SCREENSHOT}`);
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
