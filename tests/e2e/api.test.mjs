// The local API as other front-ends use it: `dramatis-cli serve` on the tiny
// model, called by the official `openai` client library and by plain HTTP with
// the bodies SillyTavern's KoboldCpp connection sends.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import http from "node:http";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import OpenAI from "openai";
import { cliBinary, installTinyModel } from "./harness.mjs";

/** Starts `dramatis-cli serve` and resolves with its base URL and a stop function. */
async function serve(dataDir, extra = []) {
  const proc = spawn(cliBinary, ["serve", "--port", "0", ...extra], {
    env: { ...process.env, DRAMATIS_DATA_DIR: dataDir, RUST_LOG: "warn" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const url = await new Promise((resolve, reject) => {
    let buf = "";
    proc.stdout.on("data", (d) => {
      buf += d;
      const m = buf.match(/listening on (http:\/\/\S+)/);
      if (m) resolve(m[1]);
    });
    proc.once("exit", (code) => reject(new Error(`serve exited with ${code}`)));
  });
  const stop = () =>
    new Promise((resolve) => {
      proc.once("exit", resolve);
      proc.kill("SIGINT");
    });
  return { url, stop };
}

const JSON_TYPE = { "content-type": "application/json" };

async function post(url, body, headers = {}) {
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json", ...headers }, body });
  return { status: res.status, json: await res.json().catch(() => null) };
}

/** Reads a server-sent event stream; `onData` gets each data payload, `stopWhen` can end early. */
async function readSse(res, onData) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, at);
      buf = buf.slice(at + 2);
      const data = block
        .split("\n")
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trim())
        .join("\n");
      if (data && onData(data) === false) {
        await reader.cancel();
        return;
      }
    }
  }
}

describe("local API", () => {
  let dataDir;
  let server;
  let client;
  const modelDir = () => path.join(dataDir, "tiny-model");

  before(async () => {
    dataDir = mkdtempSync(path.join(tmpdir(), "dramatis-api-"));
    installTinyModel(dataDir);
    server = await serve(dataDir);
    client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: "unused", maxRetries: 0 });
  });
  after(async () => {
    await server?.stop();
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("lists the model and completes like the CLI, streamed or not", async () => {
    const models = await client.models.list();
    const ids = models.data.map((m) => m.id);
    assert.deepEqual(ids, ["tiny-model"]);
    const sampling = { temperature: 0.8, top_p: 0.95, seed: 42 };
    const prompt = "The lighthouse keeper said";
    const full = await client.completions.create({ model: "tiny-model", prompt, max_tokens: 12, ...sampling, top_k: 50 });
    assert.equal(full.choices.length, 1);
    assert.equal(full.usage.completion_tokens, 12);
    assert.ok(full.usage.prompt_tokens > 0);
    // The CLI with the same seed and sampler writes the same text.
    const cli = spawnSync(
      cliBinary,
      ["generate", "--model", modelDir(), "--prompt", prompt, "--max-tokens", "12", "--temperature", "0.8", "--top-p", "0.95", "--top-k", "50", "--seed", "42", "--json"],
      { encoding: "utf8" },
    );
    assert.equal(cli.status, 0, cli.stderr);
    assert.equal(JSON.parse(cli.stdout).text, full.choices[0].text);
    const stream = await client.completions.create({ model: "tiny-model", prompt, max_tokens: 12, ...sampling, top_k: 50, stream: true });
    let text = "";
    let finish = null;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.text ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
    }
    assert.equal(text, full.choices[0].text, "streamed = not streamed");
    assert.equal(finish, "length");
  });

  it("chat completions use the role-play markers, streamed or not", async () => {
    const messages = [
      { role: "system", content: "You are Kestrel, the ship's AI." },
      { role: "user", content: "Status report?" },
    ];
    const full = await client.chat.completions.create({ model: "tiny-model", messages, max_tokens: 8, temperature: 0 });
    const reply = full.choices[0].message;
    assert.equal(reply.role, "assistant");
    assert.equal(typeof reply.content, "string");
    assert.ok(!reply.content.includes("<|user|>"), "a role-play marker ends the reply");
    let streamed = "";
    let role = null;
    for await (const chunk of await client.chat.completions.create({ model: "tiny-model", messages, max_tokens: 8, temperature: 0, stream: true })) {
      role ??= chunk.choices[0]?.delta?.role ?? null;
      streamed += chunk.choices[0]?.delta?.content ?? "";
    }
    assert.equal(role, "assistant");
    assert.equal(streamed, reply.content);
    // Laid out in the role-play markers adapters are trained on.
    const expected = "<|system|>You are Kestrel, the ship's AI.</s>\n<|user|>Status report?</s>\n<|assistant|>";
    const count = await post(`${server.url}/api/extra/tokencount`, JSON.stringify({ prompt: expected }));
    assert.equal(full.usage.prompt_tokens, count.json.value);
    // A front-end re-sends the whole history each turn: the prefix cache serves it.
    const next = await client.chat.completions.create({
      model: "tiny-model",
      messages: [...messages, { role: "assistant", content: reply.content }, { role: "user", content: "And the reactor?" }],
      max_tokens: 4,
      temperature: 0,
    });
    assert.ok(
      next.usage.prompt_tokens_details.cached_tokens >= full.usage.prompt_tokens - 1,
      `${next.usage.prompt_tokens_details.cached_tokens} of ${next.usage.prompt_tokens} prompt tokens came from the cache`,
    );
  });

  it("speaks KoboldCpp with SillyTavern's request bodies", async () => {
    const get = async (p) => (await fetch(server.url + p)).json();
    assert.deepEqual(await get("/api/v1/model"), { result: "koboldcpp/tiny-model" });
    assert.equal((await get("/api/extra/version")).result, "KoboldCpp");
    assert.equal((await get("/api/v1/config/max_context_length")).value, 2048);
    assert.equal((await get("/api/extra/true_max_context_length")).value, 2048);
    assert.ok((await get("/api/v1/info/version")).result);
    // What SillyTavern's KoboldCpp connection posts (public/scripts/kai-settings.js).
    const body = {
      prompt: "Kestrel: Hello.\nYou: Hi!\nKestrel:",
      max_context_length: 2048,
      max_length: 6,
      rep_pen: 1.1,
      rep_pen_range: 320,
      rep_pen_slope: 0.7,
      temperature: 0,
      tfs: 1,
      top_a: 0,
      top_k: 0,
      top_p: 1,
      min_p: 0.05,
      typical: 1,
      sampler_order: [6, 0, 1, 3, 4, 2, 5],
      use_default_badwordsids: false,
      stop_sequence: ["\nYou:"],
      sampler_seed: 7,
      genkey: "KCPP1234",
      can_abort: true,
      quiet: true,
      trim_stop: true,
    };
    const g = await post(`${server.url}/api/v1/generate`, JSON.stringify(body));
    assert.equal(g.status, 200, JSON.stringify(g.json));
    assert.equal(typeof g.json.results[0].text, "string");
    const res = await fetch(`${server.url}/api/extra/generate/stream`, { method: "POST", headers: JSON_TYPE, body: JSON.stringify(body) });
    let streamed = "";
    await readSse(res, (d) => {
      streamed += JSON.parse(d).token;
    });
    assert.equal(streamed, g.json.results[0].text, "stream = generate");
    const count = await post(`${server.url}/api/extra/tokencount`, JSON.stringify({ prompt: "hello world" }));
    assert.equal(count.json.value, count.json.ids.length);
    assert.ok(count.json.value > 0);
  });

  it("queues concurrent requests, all finish with what they get alone", async () => {
    const ask = (i) => client.completions.create({ prompt: `Request ${i} says`, max_tokens: 6, temperature: 0 });
    const alone = [];
    for (let i = 0; i < 4; i++) alone.push((await ask(i)).choices[0].text);
    const together = await Promise.all([0, 1, 2, 3].map(ask));
    assert.deepEqual(
      together.map((r) => r.choices[0].text),
      alone,
    );
  });

  it("abort and a disconnect stop a generation within a token", async () => {
    const long = JSON.stringify({ prompt: "Once", max_length: 1500, temperature: 1, sampler_seed: 3 });
    // Abort: the stream ends soon after the call.
    const res = await fetch(`${server.url}/api/extra/generate/stream`, { method: "POST", headers: JSON_TYPE, body: long });
    let tokens = 0;
    let atAbort = null;
    let aborted = null;
    let finish = null;
    await readSse(res, (d) => {
      const m = JSON.parse(d);
      if (m.finish_reason) finish = m.finish_reason;
      else tokens++;
      if (tokens === 3 && !aborted) {
        aborted = post(`${server.url}/api/extra/abort`, "{}").then((r) => {
          atAbort = tokens;
          return r;
        });
      }
    });
    assert.equal((await aborted).json.success, true);
    // Once abort has answered, at most the token being written still arrives.
    assert.ok(tokens - atAbort <= 1, `${tokens - atAbort} tokens after the abort answered`);
    assert.ok(tokens < 50, `stopped early (${tokens} tokens)`);
    assert.equal(finish, "stop");
    // Disconnect: drop the stream after 3 tokens; the next request runs at once.
    const ctl = new AbortController();
    const res2 = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: JSON_TYPE,
      body: JSON.stringify({ prompt: "Once", max_tokens: 1500, stream: true, temperature: 1 }),
      signal: ctl.signal,
    });
    let n = 0;
    await readSse(res2, () => {
      n++;
      if (n === 3) return false;
    }).catch(() => {});
    ctl.abort();
    const t0 = Date.now();
    const next = await client.completions.create({ prompt: "Next", max_tokens: 2, temperature: 0 });
    assert.equal(next.usage.completion_tokens, 2);
    // 1,500 tokens of the tiny model take seconds; the next request did not wait for them.
    assert.ok(Date.now() - t0 < 2500, `the next request waited ${Date.now() - t0} ms`);
  });

  it("refuses bad requests with a 4xx JSON error and keeps serving", async () => {
    const u = `${server.url}/v1/completions`;
    const cases = [
      ["{not json", 400, /not valid JSON/],
      [JSON.stringify({ prompt: "x", max_tokens: -5 }), 400, /max_tokens must be at least 1/],
      [JSON.stringify({ prompt: "x", model: "gpt-4" }), 404, /no model is called "gpt-4"/],
      [JSON.stringify({ prompt: "x", temperature: 99 }), 400, /temperature must be between/],
      [JSON.stringify({ prompt: "x", n: 3 }), 400, /n = 1/],
      [JSON.stringify({ max_tokens: 3 }), 400, /prompt is required/],
      [JSON.stringify({ prompt: "x".repeat(10 * 1024 * 1024) }), 413, /too large/],
      [JSON.stringify({ prompt: "storm ".repeat(3000), max_tokens: 4 }), 400, /context holds 2048/],
    ];
    for (const [body, status, message] of cases) {
      const r = await post(u, body);
      assert.equal(r.status, status, `${body.slice(0, 40)} → ${JSON.stringify(r.json)}`);
      assert.match(r.json.error.message, message);
    }
    // A page's no-cors POST (text/plain) and a rebinding host name are refused.
    const plain = await fetch(u, { method: "POST", headers: { "content-type": "text/plain" }, body: JSON.stringify({ prompt: "x" }) });
    assert.equal(plain.status, 415);
    const { hostname, port } = new URL(server.url);
    const rebound = await new Promise((resolve, reject) => {
      const req = http.request({ hostname, port, path: "/v1/models", headers: { host: `evil.example:${port}` } }, (res) => {
        res.resume();
        resolve(res.statusCode);
      });
      req.on("error", reject);
      req.end();
    });
    assert.equal(rebound, 403);
    // Several names for one setting (front-ends send them together): the first wins.
    const both = await post(u, JSON.stringify({ prompt: "x", max_tokens: 3, max_new_tokens: 9, n_predict: 9, stop: ["zz"], stopping_strings: ["yy"], seed: 1, sampler_seed: 2, temperature: 0 }));
    assert.equal(both.status, 200, JSON.stringify(both.json));
    assert.equal(both.json.usage.completion_tokens, 3);
    const chat = await post(`${server.url}/v1/chat/completions`, JSON.stringify({ messages: [{ role: "wizard", content: "hi" }] }));
    assert.equal(chat.status, 400);
    const kobold = await post(`${server.url}/api/v1/generate`, JSON.stringify({ prompt: 5 }));
    assert.equal(kobold.status, 400);
    assert.ok(kobold.json.detail.msg, "KoboldCpp's error shape");
    const ok = await client.completions.create({ prompt: "Still here", max_tokens: 2, temperature: 0 });
    assert.equal(ok.usage.completion_tokens, 2);
  });

  it("past 32 waiting requests, more get a 503 and the rest finish", async () => {
    const many = await Promise.all(
      Array.from({ length: 40 }, (_, i) => post(`${server.url}/v1/completions`, JSON.stringify({ prompt: `n${i}`, max_tokens: 12, temperature: 0 }))),
    );
    const busy = many.filter((r) => r.status === 503);
    const ok = many.filter((r) => r.status === 200);
    assert.ok(busy.length >= 1 && busy.length <= 8, `${busy.length} refused`);
    assert.equal(ok.length + busy.length, 40);
    assert.match(busy[0].json.error.message, /already waiting/);
    assert.ok(ok.every((r) => r.json.usage.completion_tokens === 12));
  });

  it("a client that hangs up on a plain request stops it too", async () => {
    const { hostname, port } = new URL(server.url);
    await new Promise((resolve) => {
      const req = http.request({ hostname, port, path: "/v1/completions", method: "POST", headers: JSON_TYPE });
      req.on("error", () => resolve());
      req.end(JSON.stringify({ prompt: "Once", max_tokens: 1500, temperature: 1 }));
      setTimeout(() => {
        req.destroy();
        resolve();
      }, 300);
    });
    const t0 = Date.now();
    const next = await client.completions.create({ prompt: "Next", max_tokens: 2, temperature: 0 });
    assert.equal(next.usage.completion_tokens, 2);
    assert.ok(Date.now() - t0 < 2500, `the next request waited ${Date.now() - t0} ms`);
  });

  it("answers browsers only from the origins it was told", async () => {
    const preflight = (url, origin) =>
      new Promise((resolve, reject) => {
        const { hostname, port } = new URL(url);
        const req = http.request(
          {
            hostname,
            port,
            path: "/v1/completions",
            method: "OPTIONS",
            headers: { origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type" },
          },
          (res) => {
            res.resume();
            resolve(res.headers["access-control-allow-origin"] ?? null);
          },
        );
        req.on("error", reject);
        req.end();
      });
    assert.equal(await preflight(server.url, "http://localhost:8000"), null, "no CORS unless configured");
    const web = await serve(dataDir, ["--cors", "http://localhost:8000"]);
    try {
      assert.equal(await preflight(web.url, "http://localhost:8000"), "http://localhost:8000");
      assert.equal(await preflight(web.url, "http://evil.example"), null);
    } finally {
      await web.stop();
    }
  });

  it("needs the key on every route when one is set", async () => {
    const keyed = await serve(dataDir, ["--api-key", "s3cret"]);
    try {
      for (const p of ["/v1/models", "/api/v1/model"]) {
        assert.equal((await fetch(keyed.url + p)).status, 401, p);
      }
      const bad = new OpenAI({ baseURL: `${keyed.url}/v1`, apiKey: "wrong", maxRetries: 0 });
      await assert.rejects(bad.models.list(), (e) => e.status === 401);
      const good = new OpenAI({ baseURL: `${keyed.url}/v1`, apiKey: "s3cret", maxRetries: 0 });
      assert.equal((await good.models.list()).data.length, 1);
    } finally {
      await keyed.stop();
    }
  });
});
