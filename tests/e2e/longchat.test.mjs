// A chat far longer than the window, end to end in the real window: the
// window bar, the marker at the first message the model still sees, the
// prompt inspector, and the memory panel across a restart.
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { afterEach, beforeEach, describe, it } from "node:test";
import { Driver, clearField, close, installTinyModel, invoke, screenshot } from "./harness.mjs";

/** A SillyTavern chat file of `turns` messages (about 9,000 tokens for 300). */
function longChat(turns) {
  const words = ["the", "storm", "ship", "captain", "reactor", "hums", "stars", "drift", "signal", "engine", "night"];
  const lines = [JSON.stringify({ user_name: "You", character_name: "Kestrel", chat_metadata: {} })];
  for (let i = 0; i < turns; i++) {
    const n = 12 + ((i * 7) % 23);
    const text = Array.from({ length: n }, (_, j) => words[(i * 3 + j * 5) % words.length]).join(" ");
    lines.push(JSON.stringify({ name: i % 2 ? "You" : "Kestrel", is_user: i % 2 === 1, mes: `Turn ${i}: ${text}.` }));
  }
  return lines.join("\n");
}

async function openChat(browser) {
  await browser.$('[data-testid="nav-chats"]').click();
  const pick = await browser.$('[data-testid="chat-character"]');
  await pick.waitForExist({ timeout: 10000 });
  await pick.selectByVisibleText("Kestrel");
  await browser.$('[data-testid="chat-item"]').waitForExist({ timeout: 10000 });
  await browser.$('[data-testid="chat-item"]').click();
  await browser.$('[data-testid="composer"]').waitForExist({ timeout: 10000 });
}

describe("long chat", () => {
  let driver;
  beforeEach(async () => {
    driver = await Driver.start();
    installTinyModel(driver.dataDir);
  });
  afterEach(async () => {
    await driver?.stop();
  });

  it("a reply past the window shows its window, its prompt, and a memory that persists", async () => {
    let browser = await driver.launch();
    try {
      const file = path.join(driver.dataDir, "long-chat.jsonl");
      writeFileSync(file, longChat(300));
      const cs = await invoke(browser, "list_characters", { query: {} });
      const imported = await invoke(browser, "import_chat", { characterId: cs.find((c) => c.name === "Kestrel").id, path: file });
      assert.equal(imported.messages.length, 300);
      const chatId = imported.chat.id;
      await invoke(browser, "set_chat_settings", {
        chatId,
        settings: { ...imported.settings, temperature: 0, max_new_tokens: 24, seed: 5 },
      });
      await openChat(browser);

      await browser.$('[data-testid="composer"]').setValue("Where are we now?");
      await browser.keys(["Enter"]);
      await browser.$('[data-testid="send"]').waitForExist({ timeout: 60000 });
      await browser.waitUntil(async () => (await browser.$$('[data-testid="message"]')).length === 302, { timeout: 20000 });

      // The marker sits right before the first message the prompt held.
      const view = await invoke(browser, "chat_view", { chatId });
      assert.ok(view.window_start_id, "the reply's window is known");
      const marker = await browser.$('[data-testid="window-marker"]');
      await marker.waitForExist({ timeout: 10000 });
      assert.equal(Number(await marker.getAttribute("data-before")), view.window_start_id);
      const next = await browser.execute(() => document.querySelector('[data-testid="window-marker"]').nextElementSibling.dataset.id);
      assert.equal(Number(next), view.window_start_id);
      const above = await browser.execute(() => {
        let n = 0;
        for (let e = document.querySelector('[data-testid="window-marker"]').previousElementSibling; e; e = e.previousElementSibling)
          if (e.dataset.testid === "message") n++;
        return n;
      });
      const reply = view.messages.at(-1);
      const report = await invoke(browser, "prompt_report", { messageId: reply.id });
      assert.equal(above, report.turns_dropped, "messages above the marker are the ones left out");
      assert.ok(report.turns_dropped > 250);

      // The window bar has the prompt's sections; their tokens add up to the prompt's.
      await browser.$('[data-testid="window-bar"]').waitForExist({ timeout: 10000 });
      const kinds = await browser.$$('[data-testid="window-bar"] .seg').map((s) => s.getAttribute("data-kind"));
      assert.deepEqual(kinds.filter((k) => k !== "free").slice(0, 1), ["system_prompt"]);
      assert.ok(kinds.includes("history") && kinds.includes("reply"));

      // The long-chat settings: the mode, the summary and the author's note.
      await browser.$('[data-testid="chat-settings-button"]').click();
      await browser.$('[data-testid="setting-memory-position"]').selectByAttribute("value", "chat");
      await browser.$('[data-testid="setting-author-note"]').setValue("Keep the storm in mind.");
      await screenshot(browser, "chat-settings-long");
      await browser.$('[data-testid="settings-save"]').click();
      await browser.waitUntil(async () => (await invoke(browser, "chat_view", { chatId })).settings.author_note.text === "Keep the storm in mind.", {
        timeout: 10000,
        timeoutMsg: "the author's note was not saved",
      });
      assert.equal((await invoke(browser, "chat_view", { chatId })).settings.memory_depth, 4);

      // The inspector: sections with counts, the turns left out, the cache's counts.
      const prompts = await browser.$$('[data-testid="inspect-prompt"]');
      await prompts[prompts.length - 1].click();
      const inspector = await browser.$('[data-testid="prompt-inspector"]');
      await inspector.waitForExist({ timeout: 10000 });
      assert.match(await browser.$('[data-testid="inspector-summary"]').getText(), /of 2048 tokens|window 2048/);
      assert.match(await browser.$('[data-testid="inspector-summary"]').getText(), new RegExp(`${report.turns_dropped} left out`));
      assert.match(await browser.$('[data-testid="inspector-counts"]').getText(), /Reused \d+ Shifted \d+ Computed \d+/);
      const names = await browser.$$('[data-testid="inspector-sections"] li .name').map((e) => e.getText());
      assert.equal(names[0], "System prompt");
      assert.ok(names.includes("History"));
      await browser.$('[data-testid="inspector-sections"] li:nth-child(1) .section-head').click();
      assert.match(await browser.$(".section-text").getText(), /^<\|system\|>/);
      await screenshot(browser, "prompt-inspector");
      await browser.$('[data-testid="inspector-close"]').click();

      // Memory: the background summary finishes, then the user rewrites it.
      await browser.waitUntil(async () => (await browser.$('[data-testid="memory-button"]').getAttribute("data-summarizing")) === "false", {
        timeout: 60000,
        timeoutMsg: "the summary never finished",
      });
      await browser.$('[data-testid="memory-button"]').click();
      const box = await browser.$('[data-testid="memory-text"]');
      await box.waitForExist({ timeout: 10000 });
      await clearField(browser, box);
      await box.addValue("They crossed the storm and lost the signal.");
      await screenshot(browser, "memory-panel");
      await browser.$('[data-testid="memory-save"]').click();
      await browser.waitUntil(async () => (await invoke(browser, "chat_view", { chatId })).memory?.edited === true, { timeout: 10000 });

      browser = await driver.restart(browser);
      await openChat(browser);
      await browser.$('[data-testid="memory-button"]').click();
      await browser.waitUntil(
        async () => (await browser.$('[data-testid="memory-text"]').getValue()) === "They crossed the storm and lost the signal.",
        { timeout: 10000, timeoutMsg: "the summary did not persist" },
      );
      assert.match(await browser.$('[data-testid="memory-source"]').getText(), /Written by you/);
      await screenshot(browser, "chat-long");
    } finally {
      await close(browser);
    }
  });
});
