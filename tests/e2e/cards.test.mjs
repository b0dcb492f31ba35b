// Character cards and lorebooks in the real window: a PNG card (written here,
// by a PNG writer that is not Dramatis's) imported through the path the file
// dialog feeds and by a drop on the window, its avatar in the gallery, a
// duplicate dialog, a lorebook entry firing in a chat and shown with its
// reason, a PNG export that re-imports identical, the linter, the Lorebooks view.
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, it } from "node:test";
import { Driver, close, installTinyModel, invoke, screenshot, waitForCards } from "./harness.mjs";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(buf) {
  let c = 0xffffffff;
  for (const b of buf) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** `png` with tEXt chunks (keyword → text) inserted before IEND. */
function withTextChunks(png, chunks) {
  const iend = png.length - 12;
  assert.equal(png.subarray(iend + 4, iend + 8).toString("latin1"), "IEND");
  const parts = [png.subarray(0, iend)];
  for (const [keyword, text] of chunks) {
    const data = Buffer.concat([Buffer.from(keyword, "latin1"), Buffer.from([0]), Buffer.from(text, "latin1")]);
    const head = Buffer.alloc(8);
    head.writeUInt32BE(data.length, 0);
    head.write("tEXt", 4, "latin1");
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])), 0);
    parts.push(head, data, crc);
  }
  parts.push(png.subarray(iend));
  return Buffer.concat(parts);
}

const card = {
  spec: "chara_card_v2",
  spec_version: "2.0",
  data: {
    name: "Captain Ysolde Marr",
    description: "{{char}} commands the airship Kestrel's Rest. <img src=x onerror=alert(1)>",
    personality: "bold",
    scenario: "",
    first_mes: "Hold fast, {{user}}!",
    mes_example: "",
    creator_notes: "A sky pirate with a lorebook.",
    system_prompt: "",
    post_history_instructions: "",
    alternate_greetings: [],
    tags: ["Adventure"],
    creator: "e2e",
    character_version: "1",
    extensions: { talkativeness: "0.5", other_app: { kept: [1, 2] } },
    character_book: {
      name: "Marr's world",
      entries: [
        { keys: ["engine"], content: "The engine is named Old Sol.", enabled: true, insertion_order: 10, id: 1, comment: "engine", extensions: {} },
        { keys: ["kraken"], content: "Krakens fear fire.", enabled: true, insertion_order: 20, id: 2, comment: "kraken", extensions: {} },
      ],
    },
  },
};

function b64(v) {
  return Buffer.from(JSON.stringify(v), "utf8").toString("base64");
}

/** Files dropped on the window: the event the shell emits for a native drop. */
async function drop(browser, paths) {
  await invoke(browser, "plugin:event|emit", { event: "tauri://drag-enter", payload: { paths, position: { x: 40, y: 40 } } });
  await invoke(browser, "plugin:event|emit", { event: "tauri://drag-drop", payload: { paths, position: { x: 40, y: 40 } } });
}

describe("cards and lorebooks", () => {
  let driver;
  beforeEach(async () => {
    driver = await Driver.start();
    installTinyModel(driver.dataDir);
  });
  afterEach(async () => {
    await driver?.stop();
  });

  it("imports a PNG card by the dialog's path and by a drop, chats with its lorebook, exports it back", async () => {
    const picture = readFileSync(path.join(root, "assets/characters/captain-isolde-varga.png"));
    const v3 = { ...card, spec: "chara_card_v3", spec_version: "3.0", data: { ...card.data, nickname: "Ysolde", group_only_greetings: [] } };
    const pngPath = path.join(driver.dataDir, "ysolde.png");
    writeFileSync(pngPath, withTextChunks(picture, [["chara", b64(card)], ["ccv3", b64(v3)]]));
    const worldPath = path.join(driver.dataDir, "Harbor.json");
    writeFileSync(
      worldPath,
      JSON.stringify({
        entries: {
          5: {
            uid: 5,
            key: ["harbor"],
            content: 'The harbor smells of tar. <img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>',
            comment: "harbor <b>bold</b>",
            order: 100,
            position: 0,
          },
        },
      }),
    );
    const junkPath = path.join(driver.dataDir, "broken.png");
    writeFileSync(junkPath, picture.subarray(0, 300));

    const browser = await driver.launch();
    try {
      await waitForCards(browser, 6);
      // The path the Import button's file dialog hands over.
      const [outcome] = await invoke(browser, "import_cards", { paths: [pngPath], onDuplicate: "ask" });
      assert.equal(outcome.status, "imported", JSON.stringify(outcome));
      const id = outcome.character.id;
      await browser.$('[data-testid="nav-lorebooks"]').click();
      await browser.$('[data-testid="nav-characters"]').click();
      await waitForCards(browser, 7);
      const tile = await browser.$('[data-testid="character-card"][data-name="Captain Ysolde Marr"]');
      await browser.waitUntil(async () => (await browser.execute((el) => el.querySelector("img")?.naturalWidth ?? 0, tile)) > 0, {
        timeout: 10000,
        timeoutMsg: "the imported card's avatar did not load",
      });
      const stored = await invoke(browser, "get_character", { id });
      assert.equal(stored.card.nickname, "Ysolde", "ccv3 wins over chara");
      assert.deepEqual(stored.card.extensions.other_app, { kept: [1, 2] });

      // A drop on the window: the same card again (a duplicate), a lorebook, and a broken file.
      await drop(browser, [pngPath, worldPath, junkPath]);
      const dialog = await browser.$('[data-testid="duplicate-dialog"]');
      await dialog.waitForExist({ timeout: 10000 });
      const report = await browser.$('[data-testid="import-report"]');
      await report.waitForExist({ timeout: 10000 });
      const reportText = await report.getText();
      assert.match(reportText, /Lorebook Harbor imported with 1 entry/);
      assert.match(reportText, /broken\.png was not imported: /);
      await screenshot(browser, "import-duplicate");
      await browser.$('[data-testid="dup-skip"]').click();
      await dialog.waitForExist({ reverse: true, timeout: 10000 });
      await waitForCards(browser, 7);
      await screenshot(browser, "import-report");

      // Chat: the card's lorebook entry fires when its key comes up.
      const chat = await invoke(browser, "start_chat", { characterId: id });
      await invoke(browser, "set_chat_settings", { chatId: chat.chat.id, settings: { ...chat.settings, temperature: 0, max_new_tokens: 8, seed: 3 } });
      await browser.$('[data-testid="nav-chats"]').click();
      const pick = await browser.$('[data-testid="chat-character"]');
      await pick.waitForExist({ timeout: 10000 });
      await pick.selectByVisibleText("Captain Ysolde Marr");
      await browser.$('[data-testid="chat-item"]').waitForExist({ timeout: 10000 });
      await browser.$('[data-testid="chat-item"]').click();
      await browser.$('[data-testid="composer"]').waitForExist({ timeout: 10000 });
      await browser.$('[data-testid="composer"]').setValue("Is the engine ready?");
      await browser.keys(["Enter"]);
      const chip = await browser.$('[data-testid="lore-chip"]');
      await chip.waitForExist({ timeout: 60000 });
      assert.equal(await chip.getText(), "Lore 1");
      await screenshot(browser, "chat-lore-chip");
      await chip.click();
      const entry = await browser.$('[data-testid="lore-entry"]');
      await entry.waitForExist({ timeout: 10000 });
      assert.equal(await entry.getAttribute("data-comment"), "engine");
      assert.match(await entry.getText(), /"engine" in the newest message/);
      await screenshot(browser, "chat-lore-inspector");
      await browser.$('[data-testid="inspector-close"]').click();

      // Export as PNG (the path the save dialog hands over) and import it back: the same card.
      const out = path.join(driver.dataDir, "exported.png");
      await invoke(browser, "export_character", { id, format: "png", path: out });
      const [again] = await invoke(browser, "import_cards", { paths: [out], onDuplicate: "keep_both" });
      assert.equal(again.status, "imported");
      const twin = await invoke(browser, "get_character", { id: again.character.id });
      assert.deepEqual(twin.card, stored.card);
      assert.ok(twin.avatar_version !== null, "the exported PNG carries the picture");

      // The linter, live in the editor.
      await browser.$('[data-testid="nav-characters"]').click();
      await waitForCards(browser, 8);
      const first = await browser.$('[data-testid="character-card"][data-name="Captain Ysolde Marr"]');
      await first.$('[data-testid="edit-character"]').click();
      const description = await browser.$('[data-testid="field-description"]');
      await description.waitForExist({ timeout: 10000 });
      await browser.execute((el) => {
        el.value = "The captain remembers every storm she ever flew through. ".repeat(120);
        el.dispatchEvent(new Event("input", { bubbles: true }));
      }, description);
      const warnings = await browser.$('[data-testid="lint-warnings"]');
      await warnings.waitForExist({ timeout: 15000 });
      assert.match(await warnings.getText(), /2,048|window/);
      assert.match(await browser.$('[data-testid="lint-summary"]').getText(), /of 2,048 tokens/);
      await browser.execute(() => document.querySelector('[data-testid="card-lint"]').scrollIntoView());
      await screenshot(browser, "editor-lint");
      await browser.execute(() => document.querySelector('[data-testid="card-lorebook"]').scrollIntoView());
      await screenshot(browser, "editor-lorebook");
      await browser.$('[data-testid="editor-back"]').click();

      // The Lorebooks view lists the dropped world-info file.
      await browser.$('[data-testid="nav-lorebooks"]').click();
      const row = await browser.$('[data-testid="lorebook-row"][data-name="Harbor"]');
      await row.waitForExist({ timeout: 10000 });
      await screenshot(browser, "lorebooks");
      await row.$('[data-testid="lorebook-edit"]').click();
      await browser.$('[data-testid="lorebook-editor"]').waitForExist({ timeout: 10000 });
      await browser.$('[data-testid="entry-row"]').click();
      const content = await browser.$('[data-testid="entry-content"]');
      await content.waitForExist({ timeout: 10000 });
      assert.match(await content.getValue(), /<script>window.__pwned=2<\/script>/, "hostile entry text is kept as text");
      assert.equal(await browser.$('[data-testid="entry-row"]').getAttribute("data-comment"), "harbor <b>bold</b>");
      assert.match(await browser.execute(() => document.querySelector('[data-testid="entry-row"]').textContent), /harbor <b>bold<\/b>/);
      assert.equal(await browser.execute(() => window.__pwned ?? null), null, "no entry text ran as markup");
      assert.equal(await browser.execute(() => document.querySelectorAll("img[src='x']").length), 0);
      await screenshot(browser, "lorebook-editor");
    } finally {
      await close(browser);
    }
  });
});
