// Swipes become preference pairs: swipe in a chat, go on, see the pair in
// Preferences, export it as the JSONL TRL's DPO trainer reads.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
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
});
