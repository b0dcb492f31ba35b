import { afterEach, describe, expect, it, vi } from "vitest";
import { flushSync, mount, tick, unmount } from "svelte";
import { clearMocks, mockIPC } from "@tauri-apps/api/mocks";
import CharacterEditor from "./CharacterEditor.svelte";

afterEach(() => {
  clearMocks();
  document.body.innerHTML = "";
});

async function settle() {
  for (let i = 0; i < 5; i++) {
    await tick();
    await new Promise((r) => setTimeout(r, 0));
  }
}

describe("CharacterEditor", () => {
  it("shows the backend's field errors inline and stays open", async () => {
    const calls: unknown[] = [];
    mockIPC((cmd, args) => {
      calls.push({ cmd, args });
      if (cmd === "create_character") {
        throw { kind: "validation", message: "name: A character needs a name.", fields: [{ field: "name", message: "A character needs a name." }] };
      }
    });
    const onclose = vi.fn();
    const editor = mount(CharacterEditor, { target: document.body, props: { id: "new", onclose } });
    await settle();
    const tags = document.querySelector<HTMLInputElement>('[data-testid="field-tags"]')!;
    tags.value = "Noir, noir , Space";
    tags.dispatchEvent(new Event("input"));
    document.querySelector<HTMLButtonElement>('[data-testid="save-character"]')!.click();
    await settle();
    flushSync();
    expect(document.querySelector('[data-testid="error-name"]')?.textContent).toBe("A character needs a name.");
    expect(document.querySelector('[data-testid="field-name"]')?.getAttribute("aria-invalid")).toBe("true");
    expect(onclose).not.toHaveBeenCalled();
    const sent = calls.find((c) => (c as { cmd: string }).cmd === "create_character") as {
      args: { draft: { card: { tags: string[] }; avatar: { kind: string } } };
    };
    expect(sent.args.draft.card.tags).toEqual(["Noir", "Space"]);
    expect(sent.args.draft.avatar).toEqual({ kind: "keep" });
    unmount(editor);
  });

  it("loads an existing character and saves the edit", async () => {
    let saved: { name: string; extensions: unknown } | null = null;
    mockIPC((cmd, args) => {
      if (cmd === "get_character") {
        return {
          id: 7, builtin: false, avatar_version: null, tagline: "", created_at: 0, updated_at: 0,
          card: { name: "Mira", description: "<img src=x onerror=alert(1)>", personality: "", scenario: "", first_mes: "",
            mes_example: "", creator_notes: "", system_prompt: "", post_history_instructions: "", alternate_greetings: [],
            tags: ["a"], creator: "", character_version: "", extensions: { other_app: { k: 1 } } },
        };
      }
      if (cmd === "update_character") {
        saved = (args as { draft: { card: { name: string; extensions: unknown } } }).draft.card;
        return {};
      }
    });
    const onclose = vi.fn();
    mount(CharacterEditor, { target: document.body, props: { id: 7, onclose } });
    await settle();
    const name = document.querySelector<HTMLInputElement>('[data-testid="field-name"]')!;
    expect(name.value).toBe("Mira");
    // Card text lands in form values, never in markup.
    expect(document.querySelector("img[src='x']")).toBeNull();
    name.value = "Mira Vale";
    name.dispatchEvent(new Event("input"));
    document.querySelector<HTMLButtonElement>('[data-testid="save-character"]')!.click();
    await settle();
    expect(onclose).toHaveBeenCalledOnce();
    expect(saved).toMatchObject({ name: "Mira Vale", extensions: { other_app: { k: 1 } } });
  });
});
