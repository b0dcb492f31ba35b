// The streaming benchmark: synthetic pieces at 250/s through the reply channel
// into the real window. Prints the frame-time figures for BENCHMARKS.md.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { Driver, close } from "./harness.mjs";

describe("streaming", () => {
  let driver;
  before(async () => {
    driver = await Driver.start();
  });
  after(async () => {
    await driver?.stop();
  });

  it("1000 pieces at 250/s arrive in order, none dropped, and the window keeps drawing", async () => {
    const browser = await driver.launch();
    try {
      await browser.$('[data-testid="nav-settings"]').click();
      await browser.$('[data-testid="stream-test-run"]').click();
      const result = await browser.$('[data-testid="stream-test-result"]');
      await result.waitForExist({ timeout: 30000 });
      const attr = async (n) => result.getAttribute(`data-${n}`);
      const r = {
        in_order: await attr("in-order"),
        received: Number(await attr("received")),
        rate: Number(await attr("rate")),
        median_ms: Number(await attr("median")),
        p95_ms: Number(await attr("p95")),
        max_ms: Number(await attr("max")),
        long_frames: Number(await attr("long")),
        idle_median_ms: Number(await attr("idle-median")),
        idle_p95_ms: Number(await attr("idle-p95")),
      };
      console.log(`STREAM-BENCH ${JSON.stringify(r)}`);
      assert.equal(r.in_order, "true");
      assert.equal(r.received, 1000);
      assert.ok(r.rate >= 200, `rate ${r.rate}`);
      // The window kept drawing: no frame took a quarter of a second.
      assert.ok(r.max_ms < 250, `worst frame ${r.max_ms} ms`);
      // The DOM holds every piece, in order.
      const text = await browser.execute(() => document.querySelector(".stream-box")?.textContent ?? "");
      const nums = text.trim().split(/\s+/).map(Number);
      assert.deepEqual(nums, Array.from({ length: 1000 }, (_, i) => i));
    } finally {
      await close(browser);
    }
  });
});
