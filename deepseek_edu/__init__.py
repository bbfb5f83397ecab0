"""deepseek-edu."""
