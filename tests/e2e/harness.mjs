// Drives the built Dramatis app in a real WebKit window through tauri-driver.
// Each test gets its own data folder; screenshots go to target/e2e-screenshots.
import { spawn, spawnSync } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { remote } from "webdriverio";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const application = process.env.DRAMATIS_APP ?? path.join(root, "target/debug/dramatis");
export const cliBinary = path.join(root, "target/debug/dramatis-cli");
export const fixtureDir = path.join(root, "src-tauri/crates/llm/tests/fixtures/tiny");
export const screenshotDir = path.join(root, "target/e2e-screenshots");
mkdirSync(screenshotDir, { recursive: true });

let nextPort = 4444 + (process.pid % 200) * 2;

/** A running tauri-driver with its own data folder; start sessions (app launches) on it. */
export class Driver {
  /** `env`: extra variables for the app (HF_ENDPOINT, HF_HOME...). */
  static async start(env = {}) {
    const d = new Driver();
    d.dataDir = mkdtempSync(path.join(tmpdir(), "dramatis-e2e-"));
    d.port = nextPort;
    nextPort += 2;
    d.proc = spawn("tauri-driver", ["--port", String(d.port), "--native-port", String(d.port + 1)], {
      env: { ...process.env, DRAMATIS_DATA_DIR: d.dataDir, RUST_LOG: "warn", ...env },
      stdio: ["ignore", "inherit", "inherit"],
    });
    await waitForPort(d.port);
    return d;
  }

  /** Launches the app and waits for the UI to be up. */
  async launch() {
    const browser = await remote({
      hostname: "127.0.0.1",
      port: this.port,
      logLevel: "warn",
      connectionRetryCount: 0,
      capabilities: { "tauri:options": { application } },
    });
    await browser.$('[data-testid="nav-characters"]').waitForExist({ timeout: 30000 });
    return browser;
  }

  /** Ends the app and its session but keeps the data folder (an app restart). */
  async restart(browser) {
    await close(browser);
    spawnSync("pkill", ["-TERM", "-f", `^${application}$`]);
    await new Promise((r) => setTimeout(r, 500));
    return this.launch();
  }

  async stop() {
    // SIGTERM lets tauri-driver stop WebKitWebDriver; SIGKILL would orphan it.
    const exited = new Promise((r) => this.proc.once("exit", r));
    this.proc.kill("SIGTERM");
    await Promise.race([exited, new Promise((r) => setTimeout(r, 10000))]);
    // An app whose session died mid-command can outlive the driver: end it too.
    spawnSync("pkill", ["-TERM", "-f", `^${application}$`]);
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

async function waitForPort(port) {
  const deadline = Date.now() + 20000;
  while (Date.now() < deadline) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/status`);
      if (res.ok || res.status < 500) return;
    } catch {
      // not up yet
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`tauri-driver did not listen on ${port}`);
}

/** Ends a session, even one whose app already died. */
export async function close(browser) {
  try {
    await browser.deleteSession();
  } catch (e) {
    console.error(`closing the session failed: ${e.message}`);
  }
}

/** Empties a text field the way a person does, so the page sees input events
 * (WebDriver's clear() changes the value without any). */
export async function clearField(browser, element) {
  await element.click();
  await browser.keys(["Control", "a"]);
  await browser.keys(["Backspace"]);
}

/** Saves a PNG of the window under target/e2e-screenshots. */
export async function screenshot(browser, name) {
  // Let a scroll or a view change reach the screen first (frames can lag under Xvfb).
  await browser.execute(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r(null)))));
  await new Promise((r) => setTimeout(r, 250));
  await browser.saveScreenshot(path.join(screenshotDir, `${name}.png`));
}

/** Names on the gallery's cards, in order. */
export async function galleryNames(browser) {
  return browser.execute(() =>
    Array.from(document.querySelectorAll('[data-testid="character-name"]'), (n) => n.textContent ?? ""),
  );
}

/** Waits until the gallery shows exactly `count` cards. */
export async function waitForCards(browser, count) {
  await browser.waitUntil(async () => (await browser.execute(() => document.querySelectorAll('[data-testid="character-card"]').length)) === count, {
    timeout: 15000,
    timeoutMsg: `expected ${count} character cards`,
  });
}

/** A tiny Phi-2 GGUF (the engine's test fixture, quantized by the CLI) in `dir`. */
export function tinyGguf(dir) {
  const out = path.join(dir, "tiny.gguf");
  const r = spawnSync(cliBinary, ["quantize", "--type", "q8_0", "--input", fixtureDir, "--output", out], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  if (r.status !== 0) throw new Error("dramatis-cli quantize failed");
  return out;
}

/** Starts the fake Hugging Face hub (src-tauri/crates/testkit) serving `files`
 * (`repo:path` -> local file); resolves with its endpoint and a stop function. */
export async function startFakeHub(files, bytesPerSec) {
  const args = bytesPerSec ? ["--bytes-per-sec", String(bytesPerSec)] : [];
  for (const [remote, local] of Object.entries(files)) args.push(`${remote}=${local}`);
  const proc = spawn(path.join(root, "target/debug/fake-hub"), args, { stdio: ["ignore", "pipe", "inherit"] });
  const endpoint = await new Promise((resolve, reject) => {
    let buf = "";
    proc.stdout.on("data", (d) => {
      buf += d;
      if (buf.includes("\n")) resolve(buf.split("\n")[0].trim());
    });
    proc.once("exit", (code) => reject(new Error(`fake-hub exited with ${code}`)));
  });
  return { endpoint, stop: () => proc.kill("SIGTERM") };
}

/** Registers the tiny Phi fixture as the model of a data folder, through the
 * CLI (`dramatis-cli import`). Its context is widened to 2048 positions (rotary
 * positions need no weights) so replies run long enough to watch and stop. */
export function installTinyModel(dataDir) {
  const dir = path.join(dataDir, "tiny-model");
  cpSync(fixtureDir, dir, { recursive: true });
  const cfgPath = path.join(dir, "config.json");
  const cfg = JSON.parse(readFileSync(cfgPath, "utf8"));
  cfg.max_position_embeddings = 2048;
  writeFileSync(cfgPath, JSON.stringify(cfg));
  const r = spawnSync(cliBinary, ["import", dir], {
    env: { ...process.env, DRAMATIS_DATA_DIR: dataDir },
    stdio: ["ignore", "ignore", "inherit"],
  });
  if (r.status !== 0) throw new Error("dramatis-cli import failed");
}

/** Calls a shell command from the page, as the UI does; throws its error. */
export async function invoke(browser, cmd, args) {
  const r = await browser.executeAsync(
    (cmd, args, done) => window.__TAURI_INTERNALS__.invoke(cmd, args).then((v) => done({ ok: v }), (e) => done({ err: e })),
    cmd,
    args,
  );
  if ("err" in r) throw new Error(`${cmd}: ${JSON.stringify(r.err)}`);
  return r.ok;
}
