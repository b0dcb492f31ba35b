// Swipes become preference pairs: swipe in a chat, go on, see the pair in
// Preferences, export it as the JSONL TRL's DPO trainer reads; pairs imported
// from such a file train a DPO adapter in the wizard, whose chart shows the
// reward margin.
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { afterEach, beforeEach, describe, it } from "node:test";
import { Driver, close, installTinyModel, invoke, screenshot } from "./harness.mjs";

describe("preferences", () => {
  let driver;
  beforeEach(async () => {
    driver = await Driver.start();
    installTinyModel(driver.dataDir);
  });
  afterEach(async () => {
    await driver?.stop();
  });

  it("a swipe the chat went on from is a pair in Preferences and in the export", async () => {
    const browser = await driver.launch();
    try {
      const cs = await invoke(browser, "list_characters", { query: {} });
      const kestrel = cs.find((c) => c.name === "Kestrel").id;
      const view = await invoke(browser, "start_chat", { characterId: kestrel });
      const chatId = view.chat.id;
      await invoke(browser, "set_chat_settings", { chatId, settings: { ...view.settings, max_new_tokens: 6, temperature: 1, seed: null } });
      await browser.$('[data-testid="nav-chats"]').click();
      const pick = await browser.$('[data-testid="chat-character"]');
      await pick.waitForExist({ timeout: 10000 });
      await pick.selectByVisibleText("Kestrel");
      await browser.$('[data-testid="chat-item"]').click();
      const composer = await browser.$('[data-testid="composer"]');
      await composer.waitForExist({ timeout: 10000 });
      const messages = async () => (await browser.$$('[data-testid="message"]')).length;
      await composer.setValue("Status?");
      await browser.keys(["Enter"]);
      await browser.waitUntil(async () => (await messages()) === 3 && (await browser.$('[data-testid="regenerate"]').isExisting()), { timeout: 30000 });
      await browser.$('[data-testid="regenerate"]').click();
      await browser.$('[data-testid="swipe-count"]').waitForExist({ timeout: 30000 });
      await browser.waitUntil(async () => (await browser.$('[data-testid="swipe-count"]').getText()) === "2/2", { timeout: 30000 });
      await browser.waitUntil(async () => browser.$('[data-testid="regenerate"]').isExisting(), { timeout: 30000 });
      await composer.setValue("Go on.");
      await browser.keys(["Enter"]);
      await browser.waitUntil(async () => (await messages()) === 5, { timeout: 30000 });
      await browser.waitUntil(async () => browser.$('[data-testid="regenerate"]').isExisting(), { timeout: 30000 });

      await browser.$('[data-testid="nav-preferences"]').click();
      await browser.$('[data-testid="prefs-character"]').selectByVisibleText("Kestrel");
      const pair = await browser.$('[data-testid="pair"]');
      await pair.waitForExist({ timeout: 10000 });
      assert.equal(await pair.getAttribute("data-kind"), "swipe");
      assert.match(await browser.$('[data-testid="prefs-counts"]').getText(), /^1 pair: 1 from swipes, 0 from edits/);
      const v = await invoke(browser, "chat_view", { chatId });
      const chosen = v.messages[2];
      assert.equal(chosen.swipe_index, 1, "the second swipe is the one the chat went on from");
      assert.equal((await pair.$('[data-testid="pair-chosen"]').getText()).trim(), chosen.content.trim());
      await screenshot(browser, "preferences");

      const out = path.join(driver.dataDir, "prefs.jsonl");
      assert.equal(await invoke(browser, "export_preferences", { characterId: kestrel, path: out }), 1);
      const [line] = readFileSync(out, "utf8").trim().split("\n").map((l) => JSON.parse(l));
      assert.deepEqual(Object.keys(line), ["prompt", "chosen", "rejected"]);
      assert.equal(line.chosen, chosen.content);
      assert.ok(line.prompt.endsWith("<|assistant|>"));

      // Leaving the pair out shows at once and empties the export.
      await pair.$('[data-testid="pair-include"]').click();
      await browser.waitUntil(async () => /1 left out/.test(await browser.$('[data-testid="prefs-counts"]').getText()), { timeout: 10000 });
      assert.equal(await invoke(browser, "export_preferences", { characterId: kestrel, path: out }), 0);
    } finally {
      await close(browser);
    }
  });

  it("imported pairs train with DPO in the wizard: the chart shows the margin, the adapter is attached", async () => {
    const browser = await driver.launch();
    try {
      // TRL's shape: ten pairs preferring one reply style, plus a broken line.
      const file = path.join(driver.dataDir, "choices.jsonl");
      const lines = Array.from({ length: 10 }, (_, i) =>
        JSON.stringify({ prompt: `<|user|>Status ${i}?</s>\n<|assistant|>`, chosen: ` Aye, captain! All ${i} systems green.`, rejected: " whatever." }),
      );
      writeFileSync(file, [...lines.slice(0, 5), "{not json", ...lines.slice(5)].join("\n") + "\n");

      await browser.$('[data-testid="nav-preferences"]').click();
      await browser.$('[data-testid="prefs-character"]').selectByVisibleText("Kestrel");
      const entry = await browser.$('[data-testid="prefs-import-path"]');
      await entry.setValue(file);
      await browser.keys(["Enter"]);
      const note = await browser.$('[data-testid="prefs-note"]');
      await note.waitForExist({ timeout: 10000 });
      assert.match(await note.getText(), /^Imported 10 pairs, 1 line skipped \(line 6: /);
      await browser.waitUntil(async () => (await browser.$$('[data-testid="pair"]')).length === 10, { timeout: 10000 });
      assert.match(await browser.$('[data-testid="prefs-counts"]').getText(), /^10 pairs: 0 from swipes, 0 from edits, 10 imported\./);
      await screenshot(browser, "preferences-imported");

      await browser.$('[data-testid="prefs-learn"]').click();
      await browser.$('[data-testid="step-goal"]').waitForExist({ timeout: 10000 });
      assert.ok(await browser.$('[data-testid="ft-goal-choices"]').isSelected(), "the wizard opens on Learn from my choices");
      const next = await browser.$('[data-testid="ft-next-1"]');
      await next.waitForEnabled({ timeout: 10000 });
      await next.click();
      await browser.$('[data-testid="ft-check-data"]').click();
      const report = await browser.$('[data-testid="ft-report"]');
      await report.waitForExist({ timeout: 20000 });
      assert.equal(await report.getAttribute("data-pairs"), "10");
      assert.match(await report.getText(), /10 pairs ready/);
      assert.match(await report.getText(), /10 imported from files/);
      await browser.$('[data-testid="preset-choices-quick"]').click();
      await browser.waitUntil(async () => (await browser.$('[data-testid="ft-estimate"]').getText()).length > 0, { timeout: 10000 });
      await screenshot(browser, "finetune-choices-settings");
      await browser.$('[data-testid="ft-start"]').click();

      // Six steps, with the margin logged at each: the chart's right axis.
      await browser.$('[data-testid="step-result"]').waitForExist({ timeout: 180000 });
      const chart = await browser.$('[data-testid="loss-chart"]');
      assert.equal(await chart.getAttribute("data-points"), "6");
      assert.equal(await chart.getAttribute("data-margins"), "6");
      assert.equal(await chart.getAttribute("aria-label"), "Loss and reward margin over steps");
      assert.match(await browser.$('[data-testid="adapters"]').getText(), /attached to Kestrel/);
      // Before and after: the base's replies next to the new adapter's.
      await browser.$('[data-testid="ft-compare"]').click();
      const table = await browser.$('[data-testid="ft-comparison"]');
      await table.waitForExist({ timeout: 60000 });
      assert.equal((await table.$$("tbody tr")).length, 3);
      await screenshot(browser, "finetune-choices-result");

      // The run's own record: a DPO run whose margins were measured.
      const runs = await invoke(browser, "list_runs", {});
      const run = runs.find((r) => r.request?.config?.objective?.kind === "dpo");
      assert.ok(run, JSON.stringify(runs.map((r) => r.request?.config?.objective)));
      assert.equal(run.status, "finished");
      const margins = run.metrics.map((m) => m.margin);
      assert.equal(margins.length, 6);
      assert.ok(margins.every((m) => Number.isFinite(m)), JSON.stringify(margins));
      // A fresh adapter starts at the reference: a margin of 0 at the first step (B = 0).
      assert.ok(Math.abs(margins[0]) < 1e-4, `first margin ${margins[0]}`);
      // lr 1e-3 on ten identical-style pairs: the margin grows.
      assert.ok(margins[5] > margins[0], JSON.stringify(margins));
    } finally {
      await close(browser);
    }
  });
});
