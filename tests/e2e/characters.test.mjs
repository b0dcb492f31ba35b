// The character gallery and editor, end to end in the real window.
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it } from "node:test";
import { Driver, clearField, close, galleryNames, screenshot, waitForCards } from "./harness.mjs";

describe("characters", () => {
  // Each test starts from a fresh data folder: first start, six built-ins.
  let driver;
  beforeEach(async () => {
    driver = await Driver.start();
  });
  afterEach(async () => {
    await driver?.stop();
  });

  it("launches and shows the six built-in characters", async () => {
    const browser = await driver.launch();
    try {
      await waitForCards(browser, 6);
      const names = await galleryNames(browser);
      assert.deepEqual(names, [
        "Captain Isolde Varga",
        "Inspector Tomas Reyes",
        "June Park",
        "Kestrel",
        "Lady Evangeline Thorne",
        "Wren Ashdown",
      ]);
      // Avatars come through the avatar:// protocol and decode as images.
      await browser.waitUntil(
        async () =>
          browser.execute(() =>
            Array.from(document.querySelectorAll(".card img")).every((i) => i.complete && i.naturalWidth === 256),
          ),
        { timeout: 10000, timeoutMsg: "avatars did not load" },
      );
      await screenshot(browser, "gallery");
    } finally {
      await close(browser);
    }
  });

  it("creates, edits, survives a restart, filters, and deletes a character", async () => {
    let browser = await driver.launch();
    try {
      await waitForCards(browser, 6);
      await browser.$('[data-testid="new-character"]').click();
      await browser.$('[data-testid="field-name"]').setValue("Odile Marchetti");
      await browser.$('[data-testid="field-tags"]').setValue("Opera, Drama");
      await browser.$('[data-testid="field-description"]').setValue("A soprano with a secret — née Ødegaard, ça va");
      await browser.$('[data-testid="field-first_mes"]').setValue("*She lowers the score.* You're late.");
      await browser.$('[data-testid="save-character"]').click();
      await waitForCards(browser, 7);

      // Edit it.
      const card = await browser.$('[data-testid="character-card"][data-name="Odile Marchetti"]');
      await card.$('[data-testid="edit-character"]').click();
      const description = await browser.$('[data-testid="field-description"]');
      await description.waitForExist();
      assert.equal(await description.getValue(), "A soprano with a secret — née Ødegaard, ça va");
      await browser.$('[data-testid="field-personality"]').setValue("proud, exacting, secretly kind");
      await screenshot(browser, "editor");
      await browser.$('[data-testid="save-character"]').click();
      await waitForCards(browser, 7);
    } finally {
      await close(browser);
    }

    // Restart the app: everything is still there.
    browser = await driver.launch();
    try {
      await waitForCards(browser, 7);
      const card = await browser.$('[data-testid="character-card"][data-name="Odile Marchetti"]');
      assert.match(await card.getText(), /A soprano with a secret/);
      assert.match(await card.getText(), /Opera/);
      await card.$('[data-testid="edit-character"]').click();
      await browser.$('[data-testid="field-personality"]').waitForExist();
      assert.equal(await browser.$('[data-testid="field-personality"]').getValue(), "proud, exacting, secretly kind");
      assert.equal(await browser.$('[data-testid="field-first_mes"]').getValue(), "*She lowers the score.* You're late.");
      assert.equal(await browser.$('[data-testid="field-tags"]').getValue(), "Opera, Drama");
      await browser.$('[data-testid="editor-back"]').click();

      // Filter by name and by tag.
      await browser.$('[data-testid="character-search"]').setValue("odile");
      await waitForCards(browser, 1);
      await clearField(browser, await browser.$('[data-testid="character-search"]'));
      await waitForCards(browser, 7);
      const chips = await browser.$$('[data-testid="tag-filter"]');
      for (const chip of chips) {
        if ((await chip.getText()).startsWith("Opera")) await chip.click();
      }
      await waitForCards(browser, 1);
      await screenshot(browser, "filtered");
      await browser.$("button.chip").click();
      await waitForCards(browser, 7);

      // Delete asks first; cancel keeps it, confirm removes it.
      const target = await browser.$('[data-testid="character-card"][data-name="Odile Marchetti"]');
      await target.$('[data-testid="delete-character"]').click();
      await browser.$('[data-testid="confirm-dialog"]').waitForDisplayed();
      await screenshot(browser, "confirm-delete");
      await browser.$('[data-testid="confirm-cancel"]').click();
      await waitForCards(browser, 7);
      await target.$('[data-testid="delete-character"]').click();
      await browser.$('[data-testid="confirm-ok"]').click();
      await waitForCards(browser, 6);
      assert.ok(!(await galleryNames(browser)).includes("Odile Marchetti"));
    } finally {
      await close(browser);
    }
  });

  it("shows an inline error for a bad edit and saves nothing", async () => {
    const browser = await driver.launch();
    try {
      await waitForCards(browser, 6);
      const card = await browser.$('[data-testid="character-card"][data-name="Kestrel"]');
      await card.$('[data-testid="edit-character"]').click();
      const name = await browser.$('[data-testid="field-name"]');
      await name.waitForExist();
      await clearField(browser, name);
      await browser.$('[data-testid="save-character"]').click();
      const error = await browser.$('[data-testid="error-name"]');
      await error.waitForDisplayed({ timeout: 10000 });
      assert.equal(await error.getText(), "A character needs a name.");
      assert.equal(await name.getAttribute("aria-invalid"), "true");
      await screenshot(browser, "inline-error");
      await browser.$('[data-testid="editor-back"]').click();
      await waitForCards(browser, 6);
      assert.ok((await galleryNames(browser)).includes("Kestrel"), "the bad edit was not saved");
    } finally {
      await close(browser);
    }
  });

  it("renders card text as inert text, never markup", async () => {
    const browser = await driver.launch();
    try {
      await waitForCards(browser, 6);
      await browser.execute(() => {
        window.__pwned = false;
      });
      await browser.$('[data-testid="new-character"]').click();
      await browser.$('[data-testid="field-name"]').setValue('<img src=x onerror="window.__pwned=true">');
      await browser.$('[data-testid="field-creator_notes"]').setValue('<script>window.__pwned=true</script> <a href="javascript:window.__pwned=true">x</a>');
      await browser.$('[data-testid="save-character"]').click();
      await waitForCards(browser, 7);
      const card = await browser.$('[data-testid="character-card"][data-name^="<img"]');
      assert.match(await card.getText(), /<script>window.__pwned=true<\/script>/);
      assert.equal(await browser.execute(() => document.querySelectorAll('.card img[src="x"], .card script, .card a').length), 0);
      assert.equal(await browser.execute(() => window.__pwned), false);
    } finally {
      await close(browser);
    }
  });
});
