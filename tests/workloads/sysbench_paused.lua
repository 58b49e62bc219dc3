-- sysbench's own OLTP script (SB_SCRIPT: oltp_read_only, oltp_read_write), unchanged, except
-- that each thread, once its events are done, says "paused" and waits for the file
-- SB_RELEASE before it closes its prepared statements: until then the server still holds
-- their per-statement counters (performance_schema.prepared_statements_instances).
package.path = "/usr/share/sysbench/?.lua;" .. package.path
dofile("/usr/share/sysbench/" .. os.getenv("SB_SCRIPT") .. ".lua")

local close_and_disconnect = thread_done

local function released()
   local f = io.open(os.getenv("SB_RELEASE"))
   if f then
      f:close()
      return true
   end
   return false
end

function thread_done()
   io.stdout:write("paused\n")
   io.stdout:flush()
   while not released() do
      os.execute("sleep 0.05")
   end
   close_and_disconnect()
end
