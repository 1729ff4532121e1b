import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Compiles dist/ first (tsc, a few seconds): see test/global-setup.ts.
    globalSetup: ['test/global-setup.ts'],
    // End-to-end tests start real processes, tcpdump and tshark: give them room, and keep the
    // two cores of the CI machine from being oversubscribed.
    testTimeout: 120_000,
    hookTimeout: 60_000,
    maxWorkers: 2,
  },
});
