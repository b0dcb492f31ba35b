// First run and the Models view, end to end: a fake hub on 127.0.0.1 serves the
// tiny Phi-2 fixture under the catalog's names, slowly enough to watch.
import assert from "node:assert/strict";
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, afterEach, before, describe, it } from "node:test";
import { Driver, close, fixtureDir, screenshot, startFakeHub, tinyGguf } from "./harness.mjs";

describe("models", () => {
  let work, hub, driver;
  before(async () => {
    work = mkdtempSync(path.join(tmpdir(), "dramatis-e2e-hub-"));
    const gguf = tinyGguf(work);
    const tok = path.join(work, "tokenizer.json");
    copyFileSync(path.join(fixtureDir, "tokenizer.json"), tok);
    hub = await startFakeHub(
      {
        "TheBloke/phi-2-GGUF:phi-2.Q4_K_M.gguf": gguf,
        "microsoft/phi-2:tokenizer.json": tok,
      },
      300_000,
    );
  });
  after(() => {
    hub?.stop();
    rmSync(work, { recursive: true, force: true });
  });
  afterEach(async () => {
    await driver?.stop();
  });

  it("first run explains what is needed, then a download progresses to 100% and installs", async () => {
    driver = await Driver.start({ HF_ENDPOINT: hub.endpoint, HF_HOME: path.join(work, "hf") });
    const browser = await driver.launch();
    try {
      await browser.$('[data-testid="no-model-banner"]').waitForExist({ timeout: 10000 });
      await browser.$('[data-testid="nav-chats"]').click();
      const setup = await browser.$('[data-testid="model-setup"]');
      await setup.waitForExist({ timeout: 10000 });
      assert.match(await setup.getText(), /Phi-2/);
      await screenshot(browser, "first-run");

      await browser.$('[data-testid="nav-models"]').click();
      await browser.$('[data-testid="no-models"]').waitForExist({ timeout: 10000 });
      assert.match(await browser.$('[data-testid="device"]').getText(), /CPU/);
      await browser.$('[data-testid="download-phi-2-q4_k_m-button"]').click();

      // Watch the bar move: several distinct values on the way to done.
      const seen = new Set();
      const installed = await browser.$('[data-testid="installed-badge-phi-2-q4_k_m"]');
      const deadline = Date.now() + 60000;
      while (!(await installed.isExisting())) {
        assert.ok(Date.now() < deadline, "the download did not finish");
        const pct = await browser.execute(
          () => document.querySelector('[data-testid="progress-phi-2-q4_k_m"]')?.getAttribute("data-percent") ?? null,
        );
        if (pct !== null) seen.add(Number(pct));
        if (seen.size === 2) await screenshot(browser, "models-downloading");
        await browser.pause(100);
      }
      const values = [...seen].sort((a, b) => a - b);
      assert.ok(values.filter((v) => v > 0 && v < 100).length >= 2, `progress values seen: ${values}`);

      const list = await browser.$('[data-testid="installed"]');
      await list.waitForExist({ timeout: 10000 });
      const text = await list.getText();
      assert.match(text, /Phi-2 · Q4_K_M/);
      assert.match(text, /Default/);
      await screenshot(browser, "models");

      // The app now has a model: the first-run banner is gone.
      await browser.$('[data-testid="nav-characters"]').click();
      await browser.pause(500);
      assert.equal(await browser.$('[data-testid="no-model-banner"]').isExisting(), false);
    } finally {
      await close(browser);
    }
  });

  it("a bad import is refused with the reason, a good one is listed", async () => {
    driver = await Driver.start({ HF_ENDPOINT: hub.endpoint, HF_HOME: path.join(work, "hf-empty") });
    const browser = await driver.launch();
    try {
      await browser.$('[data-testid="nav-models"]').click();
      const input = await browser.$('[data-testid="import-path"]');
      await input.waitForExist({ timeout: 10000 });
      await input.setValue(path.join(work, "tokenizer.json"));
      await browser.$('[data-testid="import-submit"]').click();
      const err = await browser.$('[data-testid="import-error"]');
      await err.waitForExist({ timeout: 10000 });
      assert.match(await err.getText(), /tokenizer\.json|GGUF/);
      assert.equal(await browser.$('[data-testid="installed"]').isExisting(), false);

      // The fixture folder (config.json, safetensors, tokenizer.json) imports.
      await input.setValue(fixtureDir);
      await browser.$('[data-testid="import-submit"]').click();
      const list = await browser.$('[data-testid="installed"]');
      await list.waitForExist({ timeout: 15000 });
      assert.match(await list.getText(), /SAFETENSORS/);

      // Quantizing it to Q4_K adds a GGUF model.
      await browser.$('[data-testid^="quantize-"]').click();
      await browser.waitUntil(async () => /Q4_K · GGUF/.test(await list.getText()), {
        timeout: 30000,
        timeoutMsg: "the quantized model did not appear",
      });
    } finally {
      await close(browser);
    }
  });
});
