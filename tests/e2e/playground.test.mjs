// The local API switched on in Settings, called from outside while the window
// stays responsive, and the Playground's presets streaming and stopping.
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it } from "node:test";
import { Driver, close, installTinyModel, screenshot } from "./harness.mjs";

describe("local API and Playground in the app", () => {
  let driver;
  beforeEach(async () => {
    driver = await Driver.start();
    installTinyModel(driver.dataDir);
  });
  afterEach(async () => {
    await driver?.stop();
  });

  it("serves from Settings without blocking the UI, and the Playground streams and stops", async () => {
    const browser = await driver.launch();
    const port = 5300 + (process.pid % 500);
    try {
      await browser.$('[data-testid="nav-settings"]').click();
      const enabled = await browser.$('[data-testid="api-enabled"]');
      await enabled.waitForExist({ timeout: 10000 });
      assert.equal(await browser.$('[data-testid="api-status"]').getText(), "Off", "off by default");
      await enabled.click();
      const portField = await browser.$('[data-testid="api-port"]');
      await portField.setValue(String(port));
      await browser.$('[data-testid="api-save"]').click();
      const status = await browser.$('[data-testid="api-status"]');
      await browser.waitUntil(async () => (await status.getText()).includes(`http://127.0.0.1:${port}`), {
        timeout: 10000,
        timeoutMsg: "the server did not start",
      });
      await screenshot(browser, "settings-api");
      const base = `http://127.0.0.1:${port}`;
      const models = await (await fetch(`${base}/v1/models`)).json();
      assert.deepEqual(
        models.data.map((m) => m.id),
        ["tiny-model"],
      );

      // A long generation from another app; the window keeps answering meanwhile.
      const ctl = new AbortController();
      const res = await fetch(`${base}/api/extra/generate/stream`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ prompt: "Once", max_length: 1800, temperature: 1, sampler_seed: 1 }),
        signal: ctl.signal,
      });
      const reader = res.body.getReader();
      await reader.read(); // the first token is out: the engine is busy
      const t0 = Date.now();
      await browser.$('[data-testid="nav-characters"]').click();
      await browser.$('[data-testid="character-card"]').waitForExist({ timeout: 5000 });
      await browser.$('[data-testid="nav-settings"]').click();
      await browser.$('[data-testid="api-status"]').waitForExist({ timeout: 5000 });
      assert.ok(Date.now() - t0 < 5000, "the window answered while the API generated");
      await browser.waitUntil(async () => (await browser.$('[data-testid="api-status"]').getText()).includes("generating now"), {
        timeout: 8000,
        timeoutMsg: "Settings did not show the running request",
      });
      await screenshot(browser, "settings-api-busy");
      ctl.abort();
      await reader.cancel().catch(() => {});
      await browser.waitUntil(async () => !(await browser.$('[data-testid="api-status"]').getText()).includes("generating now"), {
        timeout: 8000,
        timeoutMsg: "the disconnected request kept the engine busy",
      });

      // The Playground: a preset, streamed text, stop.
      await browser.$('[data-testid="nav-playground"]').click();
      await browser.$('[data-testid="playground-preset"][data-name="Code completion"]').click();
      assert.match(await browser.$('[data-testid="playground-prompt"]').getValue(), /def print_prime\(n\):/);
      await browser.$('[data-testid="playground-preset"][data-name="Free text"]').click();
      assert.match(await browser.$('[data-testid="playground-prompt"]').getValue(), /^Once upon a time/);
      await browser.$('[data-testid="playground-max"]').setValue("1900");
      await browser.$('[data-testid="playground-seed"]').setValue("11");
      await browser.$('[data-testid="playground-generate"]').click();
      const output = await browser.$('[data-testid="playground-output"] mark');
      await browser.waitUntil(async () => (await browser.execute((el) => el.textContent.length, output)) > 10, {
        timeout: 15000,
        timeoutMsg: "no text streamed",
      });
      await screenshot(browser, "playground-running");
      await browser.$('[data-testid="playground-stop-button"]').click();
      const stats = await browser.$('[data-testid="playground-stats"]');
      await browser.waitUntil(async () => (await stats.getText()).includes("stopped"), { timeout: 10000, timeoutMsg: "stop did not stop" });
      const tokens = Number((await stats.getText()).match(/(\d+) tokens/)[1]);
      assert.ok(tokens > 0 && tokens < 1900, `stopped after ${tokens} tokens`);
      // A short run to its end.
      await browser.$('[data-testid="playground-preset"][data-name="Q&A"]').click();
      await browser.$('[data-testid="playground-max"]').setValue("12");
      await browser.$('[data-testid="playground-generate"]').click();
      await browser.waitUntil(async () => /12 tokens|finished/.test(await stats.getText()), { timeout: 15000, timeoutMsg: "the short run did not finish" });
      await screenshot(browser, "playground");
    } finally {
      await close(browser);
    }
  });
});
