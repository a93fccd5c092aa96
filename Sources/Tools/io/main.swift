print("io")
