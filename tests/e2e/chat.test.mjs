// Chatting end to end in the real window, with the tiny Phi fixture as the model.
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it } from "node:test";
import { Driver, clearField, close, installTinyModel, screenshot } from "./harness.mjs";

const XSS = [
  "Plain *emphasis* stays.",
  '<img src=x onerror="window.__xss=1">',
  "<script>window.__xss=2</script>",
  "[a link](javascript:window.__xss=3)",
].join("\n\n");

/** Text of every message body, in order. */
async function bodies(browser) {
  return browser.execute(() =>
    Array.from(document.querySelectorAll('[data-testid="message-body"]'), (n) => (n.textContent ?? "").trim()),
  );
}

async function waitIdle(browser) {
  await browser.$('[data-testid="send"]').waitForExist({ timeout: 60000 });
}

describe("chat", () => {
  let driver;
  beforeEach(async () => {
    driver = await Driver.start();
    installTinyModel(driver.dataDir);
  });
  afterEach(async () => {
    await driver?.stop();
  });

  it("streams a reply, stops, regenerates, swipes, edits, and survives a restart", async () => {
    let browser = await driver.launch();
    try {
      // Gallery → Chat with the first character → a new chat with its greeting.
      await browser.$('[data-testid="chat-with"]').click();
      await browser.$('[data-testid="new-chat"]').click();
      await browser.$('[data-testid="composer"]').waitForExist({ timeout: 10000 });
      assert.equal((await bodies(browser)).length, 1, "the greeting");

      // Record every state the streaming reply passes through.
      await browser.execute(() => {
        window.__states = [];
        const box = document.querySelector('[data-testid="messages"]');
        new MutationObserver(() => {
          const all = box.querySelectorAll('[data-testid="message"][data-role="assistant"] [data-testid="message-body"]');
          const last = all[all.length - 1];
          if (last && all.length > 1) window.__states.push(last.textContent.length);
        }).observe(box, { subtree: true, childList: true, characterData: true });
      });
      const composer = await browser.$('[data-testid="composer"]');
      await composer.setValue("Hello, captain.");
      await browser.keys(["Enter"]);
      await browser.$('[data-testid="stop"]').waitForExist({ timeout: 10000 });
      await waitIdle(browser);
      const states = await browser.execute(() => window.__states);
      const distinct = [...new Set(states)].filter((n) => n > 0);
      assert.ok(distinct.length >= 2, `reply states seen: ${distinct}`);
      let texts = await bodies(browser);
      assert.equal(texts.length, 3);
      assert.equal(texts[1], "Hello, captain.");
      assert.ok(texts[2].length > 0);
      assert.match(await browser.$('[data-testid="tokens-per-sec"]').getText(), /tokens\/s/);
      assert.match(await browser.$('[data-testid="context-info"]').getText(), /tokens · \d+ of \d+ turns fit/);

      // A long reply, stopped with Esc: the partial text stays.
      await browser.$('[data-testid="chat-settings-button"]').click();
      const maxTokens = await browser.$('[data-testid="setting-max-tokens"]');
      await clearField(browser, maxTokens);
      await maxTokens.addValue("1500");
      await browser.$('[data-testid="settings-save"]').click();
      await composer.setValue("Tell me the whole story.");
      await browser.keys(["Enter"]);
      await browser.waitUntil(async () => (await bodies(browser)).length === 5 && (await bodies(browser))[4].length > 20, {
        timeout: 20000,
        timeoutMsg: "the long reply did not start",
      });
      await browser.keys(["Escape"]);
      await waitIdle(browser);
      const stopped = (await bodies(browser))[4];
      assert.ok(stopped.length > 0);
      await screenshot(browser, "chat");

      // Regenerate: a second swipe; swipe back to the stopped one.
      await browser.$$('[data-testid="regenerate"]')[0].click();
      await waitIdle(browser);
      await browser.waitUntil(async () => (await browser.$$('[data-testid="swipe-count"]').map((e) => e.getText())).includes("2/2"), {
        timeout: 20000,
        timeoutMsg: "no second swipe",
      });
      const counters = await browser.$$('[data-testid="swipe-prev"]');
      await counters[counters.length - 1].click();
      await browser.waitUntil(async () => (await bodies(browser))[4] === stopped, {
        timeout: 10000,
        timeoutMsg: "swiping back did not show the stopped reply",
      });

      // Edit the last reply in place with hostile text: it renders inert.
      const edits = await browser.$$('[data-testid="edit-message"]');
      await edits[edits.length - 1].click();
      const box = await browser.$('[data-testid="edit-text"]');
      await clearField(browser, box);
      await box.addValue(XSS);
      await browser.$('[data-testid="edit-save"]').click();
      await browser.waitUntil(async () => (await bodies(browser))[4].includes("Plain emphasis stays."), { timeout: 10000 });
      const dangerous = await browser.execute(() => {
        const all = document.querySelectorAll('[data-testid="message-body"]');
        const body = all[all.length - 1];
        const bad = body.querySelectorAll("img, script, a, iframe, style").length;
        const attrs = Array.from(body.querySelectorAll("*")).flatMap((e) =>
          Array.from(e.attributes, (a) => a.name).filter((n) => n !== "class" && n !== "title"),
        );
        return bad + attrs.length;
      });
      assert.equal(dangerous, 0, "live elements or attributes in a message");
      assert.match((await bodies(browser))[4], /<script>window.__xss=2<\/script>/);
      for (const a of await browser.$$(".md .link-text")) await a.click();
      assert.equal(await browser.execute(() => window.__xss ?? null), null, "a script ran");
      const before = await bodies(browser);

      // Restart the app: the chat is there, intact.
      browser = await driver.restart(browser);
      await browser.$('[data-testid="nav-chats"]').click();
      await browser.$('[data-testid="chat-item"]').waitForExist({ timeout: 10000 });
      await browser.$('[data-testid="chat-item"]').click();
      await browser.waitUntil(async () => (await bodies(browser)).length === before.length, { timeout: 10000 });
      assert.deepEqual(await bodies(browser), before);
      assert.equal(await browser.execute(() => window.__xss ?? null), null);
    } finally {
      await close(browser);
    }
  });

  it("a card with hostile text renders inert in the gallery and the greeting", async () => {
    const browser = await driver.launch();
    try {
      // Create the card through the app's own IPC, as the editor does.
      const id = await browser.executeAsync((xss, done) => {
        window.__TAURI_INTERNALS__
          .invoke("create_character", {
            draft: { card: { name: "Mallory <b>", description: xss, first_mes: xss, tags: ["<i>x</i>"] } },
          })
          .then((c) => done(c.id), (e) => done(`error: ${JSON.stringify(e)}`));
      }, XSS);
      assert.equal(typeof id, "number", String(id));
      await browser.$('[data-testid="nav-models"]').click();
      await browser.$('[data-testid="nav-characters"]').click();
      await browser.waitUntil(async () => (await browser.$$('[data-testid="character-card"]')).length === 7, { timeout: 10000 });
      assert.equal(await browser.execute(() => document.querySelectorAll(".card img[src='x'], script:not([src])").length), 0);
      const cards = await browser.$$('[data-testid="character-card"]');
      let mallory;
      for (const c of cards) if ((await c.getText()).includes("Mallory <b>")) mallory = c;
      assert.ok(mallory, "the name shows as text");
      await mallory.$('[data-testid="chat-with"]').click();
      await browser.$('[data-testid="new-chat"]').click();
      await browser.waitUntil(async () => (await bodies(browser)).length === 1, { timeout: 10000 });
      assert.match((await bodies(browser))[0], /<img src=x onerror=/);
      assert.equal(await browser.execute(() => window.__xss ?? null), null, "a script ran");
    } finally {
      await close(browser);
    }
  });
});

describe("chat import", () => {
  let driver;
  beforeEach(async () => {
    driver = await Driver.start();
    installTinyModel(driver.dataDir);
  });
  afterEach(async () => {
    await driver?.stop();
  });

  it("a SillyTavern chat imports with its swipes and opens from search", async () => {
    const browser = await driver.launch();
    try {
      const file = new URL("./fixtures/demo-chat.jsonl", import.meta.url).pathname;
      const result = await browser.executeAsync((path, done) => {
        const invoke = window.__TAURI_INTERNALS__.invoke;
        invoke("list_characters", { query: {} })
          .then((cs) => invoke("import_chat", { characterId: cs.find((c) => c.name === "Kestrel").id, path }))
          .then((v) => done(v.messages.length), (e) => done(`error: ${JSON.stringify(e)}`));
      }, file);
      assert.equal(result, 5);
      await browser.$('[data-testid="nav-chats"]').click();
      const search = await browser.$('[data-testid="chat-search"]');
      await search.waitForExist({ timeout: 10000 });
      await search.setValue("patient admirer");
      await browser.keys(["Enter"]);
      await browser.$('[data-testid="search-hit"]').click();
      // The hit lives on the second swipe: opening it shows that branch.
      await browser.waitUntil(async () => (await bodies(browser)).some((t) => t.includes("very patient admirer")), {
        timeout: 10000,
        timeoutMsg: "the search hit did not open on its branch",
      });
      assert.ok((await browser.$$('[data-testid="swipe-count"]').map((e) => e.getText())).includes("2/2"));
      await browser.$('[data-testid="swipe-prev"]').click();
      await browser.waitUntil(async () => (await bodies(browser)).some((t) => t.includes("far too tidy")), { timeout: 10000 });
      await screenshot(browser, "chat-demo");
    } finally {
      await close(browser);
    }
  });
});
