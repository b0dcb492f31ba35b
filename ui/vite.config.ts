import { defineConfig } from "vitest/config";
import { svelte } from "@sveltejs/vite-plugin-svelte";

export default defineConfig({
  plugins: [svelte()],
  clearScreen: false,
  // Relative asset URLs work under Tauri's custom protocol on every platform.
  base: "./",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "safari15",
    // Tauri's CSP forbids inline scripts; never inline the module preload polyfill.
    modulePreload: { polyfill: false },
  },
  resolve: process.env.VITEST ? { conditions: ["browser"] } : undefined,
  test: {
    environment: "jsdom",
    include: ["src/**/*.test.ts"],
  },
});
