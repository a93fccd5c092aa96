// Shared fixtures for the test suites (temporary directories, running tools).
