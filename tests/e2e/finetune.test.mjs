// The fine-tune wizard end to end with the tiny fixture model: data check,
// estimate, a live loss chart, stop and resume, the adapter attached and used
// by chat, export, and resume offered after a restart.
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, afterEach, before, beforeEach, describe, it } from "node:test";
import { Driver, clearField, close, installTinyModel, screenshot } from "./harness.mjs";

let work;
before(() => {
  work = mkdtempSync(path.join(tmpdir(), "dramatis-e2e-ft-"));
  const rows = Array.from({ length: 40 }, (_, i) =>
    JSON.stringify({ text: `<|user|>Status ${i}?</s>\n<|assistant|>All systems nominal, captain ${i}. Beep.</s>` }),
  );
  writeFileSync(path.join(work, "rows.jsonl"), rows.join("\n"));
  writeFileSync(path.join(work, "bad.jsonl"), "not json\n{\"other\": 1}\n");
});
after(() => rmSync(work, { recursive: true, force: true }));

/** Invokes a command through the app's IPC. */
async function invoke(browser, cmd, args) {
  return browser.executeAsync(
    (c, a, done) => window.__TAURI_INTERNALS__.invoke(c, a).then(done, (e) => done({ error: e })),
    cmd,
    args,
  );
}

/** A greedy reply from a new chat with `characterId`. */
async function greedyReply(browser, characterId) {
  const v = await invoke(browser, "start_chat", { characterId });
  await invoke(browser, "set_chat_settings", {
    chatId: v.chat.id,
    settings: { format: "roleplay", temperature: 0, top_k: 0, top_p: 1, min_p: 0, repetition_penalty: 1, max_new_tokens: 16, seed: 5 },
  });
  // A channel the page ignores: what @tauri-apps/api's Channel serializes to.
  const r = await browser.executeAsync((chatId, done) => {
    const id = window.__TAURI_INTERNALS__.transformCallback(() => {});
    window.__TAURI_INTERNALS__
      .invoke("send_message", { chatId, text: "Status report?", onEvent: `__CHANNEL__:${id}` })
      .then((v) => done(v.messages.at(-1).content), (e) => done({ error: e }));
  }, v.chat.id);
  return r;
}

/** Clicks once the element can take a click (not covered, not moving). */
async function clickWhenReady(browser, selector) {
  const el = await browser.$(selector);
  await el.waitForClickable({ timeout: 10000 });
  await el.click();
}

async function pickFile(browser, file) {
  const input = await browser.$('[data-testid="ft-file"]');
  await input.setValue(file);
  await browser.keys(["Tab"]);
}

async function toSettings(browser, characterName) {
  await browser.$('[data-testid="nav-finetune"]').click();
  const who = await browser.$('[data-testid="ft-character"]');
  await who.waitForExist({ timeout: 10000 });
  if (characterName) await who.selectByVisibleText(characterName);
  // Enabled once the installed models have loaded.
  await browser.$('[data-testid="ft-next-1"]').waitForEnabled({ timeout: 10000 });
  await browser.$('[data-testid="ft-next-1"]').click();
  await pickFile(browser, path.join(work, "rows.jsonl"));
  await browser.$('[data-testid="ft-column"]').waitForExist({ timeout: 10000 });
  await clickWhenReady(browser, '[data-testid="ft-check-data"]');
  await browser.$('[data-testid="step-settings"]').waitForExist({ timeout: 20000 });
}

async function points(browser) {
  return Number(await browser.$('[data-testid="loss-chart"]').getAttribute("data-points"));
}

describe("fine-tune wizard", () => {
  let driver;
  beforeEach(async () => {
    driver = await Driver.start();
    installTinyModel(driver.dataDir);
  });
  afterEach(async () => {
    await driver?.stop();
  });

  it("a bad file keeps the wizard on the data step with the reason", async () => {
    const browser = await driver.launch();
    try {
      await browser.$('[data-testid="nav-finetune"]').click();
      await browser.$('[data-testid="ft-next-1"]').waitForEnabled({ timeout: 10000 });
      await browser.$('[data-testid="ft-next-1"]').click();
      await pickFile(browser, path.join(work, "bad.jsonl"));
      await clickWhenReady(browser, '[data-testid="ft-check-data"]');
      const err = await browser.$('[data-testid="ft-data-error"]');
      await err.waitForExist({ timeout: 10000 });
      assert.match(await err.getText(), /no usable rows|no column/);
      assert.ok(await browser.$('[data-testid="step-data"]').isExisting());
      assert.equal(await browser.$('[data-testid="step-settings"]').isExisting(), false);
    } finally {
      await close(browser);
    }
  });

  it("trains with a live chart, stops, resumes, attaches, changes chat, and exports", async () => {
    const browser = await driver.launch();
    try {
      const chars = await invoke(browser, "list_characters", { query: {} });
      const kestrel = chars.find((c) => c.name === "Kestrel");
      const before = await greedyReply(browser, kestrel.id);
      assert.equal(typeof before, "string", JSON.stringify(before));

      await toSettings(browser, "Kestrel");
      assert.match(await browser.$('[data-testid="ft-report"]').getText(), /40 rows/);

      // A setting that cannot fit: the estimate says so and proposes a change.
      await clickWhenReady(browser, '[data-testid="preset-quick"]');
      await clickWhenReady(browser, "button=Advanced");
      const batch = await browser.$('[data-testid="ft-batch_size"]');
      await clearField(browser, batch);
      await batch.addValue("100000");
      await browser.keys(["Tab"]);
      const est = await browser.$('[data-testid="ft-estimate"]');
      await browser.waitUntil(async () => /will not fit/.test(await est.getText()), { timeout: 10000, timeoutMsg: "no warning" });
      assert.match(await est.getText(), /shorten the maximum length|batch size 1|too little memory/);
      assert.equal(await browser.$('[data-testid="ft-start"]').isEnabled(), false);
      await screenshot(browser, "finetune-estimate");

      // Back to the quick preset, with more steps so there is time to stop it.
      await clickWhenReady(browser, '[data-testid="preset-quick"]');
      const steps = await browser.$('[data-testid="ft-max_steps"]');
      await clearField(browser, steps);
      await steps.addValue("60");
      await browser.keys(["Tab"]);
      await clickWhenReady(browser, '[data-testid="ft-start"]');
      await browser.waitUntil(async () => (await points(browser)) >= 3, { timeout: 60000, timeoutMsg: "the chart did not update" });
      await browser.$('[data-testid="ft-samples"]').waitForExist({ timeout: 30000 });
      await screenshot(browser, "finetune-training");
      await browser.$('[data-testid="ft-stop"]').click();
      await browser.$('[data-testid="ft-resume"]').waitForExist({ timeout: 30000 });
      const stoppedAt = await points(browser);
      assert.ok(stoppedAt < 60, `stopped at ${stoppedAt}`);
      await browser.$('[data-testid="ft-resume"]').click();
      await browser.$('[data-testid="step-result"]').waitForExist({ timeout: 120000 });
      await browser.$('[data-testid="ft-compare"]').click();
      await browser.$('[data-testid="ft-comparison"]').waitForExist({ timeout: 30000 });
      assert.match(await browser.$('[data-testid="adapters"]').getText(), /attached to Kestrel/);
      await screenshot(browser, "finetune-result");

      // Chat with the same seed and settings now answers differently.
      const afterReply = await greedyReply(browser, kestrel.id);
      assert.notEqual(afterReply, before);

      // Export as a PEFT folder.
      const adapters = await invoke(browser, "list_adapters", {});
      const out = path.join(work, "exported");
      const r = await invoke(browser, "export_adapter", { adapterId: adapters[0].id, format: "peft", path: out });
      assert.equal(r?.error, undefined, JSON.stringify(r));
      assert.ok(existsSync(path.join(out, "adapter_config.json")));
      assert.ok(existsSync(path.join(out, "adapter_model.safetensors")));
    } finally {
      await close(browser);
    }
  });

  it("after a restart in the middle of a run, resume is offered", async () => {
    let browser = await driver.launch();
    try {
      await toSettings(browser, null);
      await clickWhenReady(browser, '[data-testid="preset-quick"]');
      await clickWhenReady(browser, "button=Advanced");
      const steps = await browser.$('[data-testid="ft-max_steps"]');
      await clearField(browser, steps);
      await steps.addValue("2000");
      await browser.keys(["Tab"]);
      await clickWhenReady(browser, '[data-testid="ft-start"]');
      // Past the first checkpoint (every 4 steps in the quick preset).
      await browser.waitUntil(async () => (await points(browser)) >= 6, { timeout: 60000 });
      browser = await driver.restart(browser);
      await browser.$('[data-testid="nav-finetune"]').click();
      const banner = await browser.$('[data-testid="resume-banner"]');
      await banner.waitForExist({ timeout: 10000 });
      assert.match(await banner.getText(), /step \d+ of 2000/);
    } finally {
      await close(browser);
    }
  });
});
