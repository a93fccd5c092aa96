print("ex")
