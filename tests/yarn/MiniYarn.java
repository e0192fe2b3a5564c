// MiniYarn.java - one JVM = 1 ResourceManager + 1 NodeManager (Hadoop's MiniYARNCluster), loopback only.
//
// Usage (a single-file source program, no javac step; run it with the cwd a scratch directory, because
// MiniYARNCluster puts its RM/NM directories under ./target/test/data/miniyarn/, and deletes what is there):
//
//   java @tests/yarn/jvm.flags -Dlog4j.configuration=file:tests/yarn/log4j.properties -cp "<lib>/*" \
//        tests/yarn/MiniYarn.java <confDir> [key=value ...]
//
// key=value pairs override the configuration below; tests/yarncluster.py passes the five RM ports
// (yarn.resourcemanager.{address,scheduler.address,resource-tracker.address,admin.address,webapp.address}) so that
// two clusters, or a stale one, never collide.  Once the RM and the NM run and the NM has registered, it writes
// <confDir>/yarn-site.xml (the whole effective configuration) and core-site.xml (use <confDir> as HADOOP_CONF_DIR),
// then <confDir>/READY (the RM web URL), atomically, and blocks.
//
// It stops (the NM kills its containers) on SIGTERM/SIGINT and when its stdin reaches EOF, so a
// parent that holds a pipe to stdin and dies, even by SIGKILL, takes the cluster with it.  Start it with
// stdin=/dev/null only if something else stops it.
import java.io.File;
import java.io.FileOutputStream;
import java.io.InputStream;
import java.io.OutputStream;
import java.lang.reflect.Field;
import java.lang.reflect.Method;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.yarn.conf.YarnConfiguration;
import org.apache.hadoop.yarn.server.MiniYARNCluster;
import org.apache.hadoop.yarn.server.resourcemanager.ResourceManager;

public class MiniYarn {
  public static void main(String[] args) {
    try {
      run(args);
    } catch (Throwable e) {
      // the RM/NM threads are not daemons: a failed start must end the JVM itself, or it would never end
      e.printStackTrace();
      System.err.println("MINIYARN FAILED: " + e);
      Runtime.getRuntime().halt(1);
    }
  }

  private static void run(String[] args) throws Exception {
    if (args.length < 1) {
      System.err.println("usage: MiniYarn <confDir> [key=value ...]");
      System.exit(2);
    }
    File confDir = new File(args[0]).getAbsoluteFile();
    confDir.mkdirs();
    String h = "127.0.0.1";
    YarnConfiguration c = new YarnConfiguration();
    // Fixed, loopback-only RM endpoints (otherwise MiniYARNCluster binds everything to <hostname>:0).
    c.setBoolean(YarnConfiguration.YARN_MINICLUSTER_FIXED_PORTS, true);
    c.set(YarnConfiguration.RM_HOSTNAME, h);
    c.set(YarnConfiguration.RM_ADDRESS, h + ":8032");
    c.set(YarnConfiguration.RM_SCHEDULER_ADDRESS, h + ":8030");
    c.set(YarnConfiguration.RM_RESOURCE_TRACKER_ADDRESS, h + ":8031");
    c.set(YarnConfiguration.RM_ADMIN_ADDRESS, h + ":8033");
    c.set(YarnConfiguration.RM_WEBAPP_ADDRESS, h + ":8088");
    c.set("fs.defaultFS", "file:///");
    c.set("hadoop.tmp.dir", new File("target/hadoop-tmp").getAbsolutePath());
    // capacity-scheduler.xml is not inside hadoop-client-minicluster (same workaround as Spark's BaseYarnClusterSuite)
    // "small" (10 %) is where tests ask for more than a queue holds and watch the application wait in ACCEPTED
    c.set("yarn.scheduler.capacity.root.queues", "default,small");
    c.set("yarn.scheduler.capacity.root.default.capacity", "90");
    c.set("yarn.scheduler.capacity.root.small.capacity", "10");
    c.set("yarn.scheduler.capacity.root.small.maximum-capacity", "10");
    c.set("yarn.scheduler.capacity.root.small.state", "RUNNING");
    c.set("yarn.scheduler.capacity.root.small.acl_submit_applications", "*");
    c.set("yarn.scheduler.capacity.root.default.maximum-capacity", "100");
    c.set("yarn.scheduler.capacity.root.default.user-limit-factor", "1");
    c.set("yarn.scheduler.capacity.root.default.state", "RUNNING");
    c.set("yarn.scheduler.capacity.root.default.acl_submit_applications", "*");
    c.set("yarn.scheduler.capacity.root.default.acl_administer_queue", "*");
    c.set("yarn.scheduler.capacity.node-locality-delay", "-1");
    // the gateway's user (root here) may submit as the kernel's user: spark-submit --proxy-user
    c.set("hadoop.proxyuser.root.hosts", "*");
    c.set("hadoop.proxyuser.root.groups", "*");
    // default 0.1 => only ~one AM at a time; every kernel is an AM here
    c.set("yarn.scheduler.capacity.maximum-am-resource-percent", "1.0");
    // logical capacity of the single NM (MiniYARNCluster copies this into yarn.nodemanager.resource.memory-mb)
    c.setInt(YarnConfiguration.YARN_MINICLUSTER_NM_PMEM_MB, 12288);
    c.setInt(YarnConfiguration.NM_VCORES, 8);
    c.setInt(YarnConfiguration.RM_SCHEDULER_MINIMUM_ALLOCATION_MB, 128);
    c.setInt(YarnConfiguration.RM_SCHEDULER_MAXIMUM_ALLOCATION_MB, 4096);
    c.setInt(YarnConfiguration.RM_SCHEDULER_MAXIMUM_ALLOCATION_VCORES, 8);
    // never mark the node unhealthy because the disk is nearly full (Spark/Kyuubi do the same)
    c.set("yarn.nodemanager.disk-health-checker.max-disk-utilization-per-disk-percentage", "100.0");
    c.set("yarn.nodemanager.disk-health-checker.min-free-space-per-disk-mb", "0");
    c.setBoolean(YarnConfiguration.NM_VMEM_CHECK_ENABLED, false);
    c.setBoolean(YarnConfiguration.NM_PMEM_CHECK_ENABLED, false);
    c.setBoolean(YarnConfiguration.TIMELINE_SERVICE_ENABLED, false);
    c.setInt("yarn.resourcemanager.nodemanagers.heartbeat-interval-ms", 250);
    for (int i = 1; i < args.length; i++) { // key=value overrides
      int eq = args[i].indexOf('=');
      if (eq <= 0) {
        System.err.println("MiniYarn: not key=value: " + args[i]);
        System.exit(2);
      }
      c.set(args[i].substring(0, eq), args[i].substring(eq + 1));
    }

    MiniYARNCluster cluster = new MiniYARNCluster("miniyarn", 1, 1, 1);
    // On exit stop only the NodeManager, which SIGTERMs every container's process group (SIGKILL 250 ms later), then
    // halt.  Give it at most 5 s: with a container alive its stop takes ~17 s more (it waits for its applications to
    // be cleaned up with an RM that is going away), and the full cluster.stop() would also wait ~20 s in the RM for
    // AMs that "are still alive".  Nothing here keeps state worth a clean stop (NullRMStateStore, files in ./target),
    // and Hadoop's own shutdown hooks would only delay the exit.
    Runtime.getRuntime().addShutdownHook(new Thread(() -> {
      System.err.println(java.time.LocalTime.now() + " MINIYARN stopping the NodeManager");
      Thread stopper = new Thread(() -> {
        try {
          if (cluster.getNodeManager(0) != null) {
            cluster.getNodeManager(0).stop();
          }
        } catch (Throwable e) {
          e.printStackTrace();
        }
      });
      stopper.setDaemon(true);
      stopper.start();
      try {
        stopper.join(5000);
      } catch (InterruptedException e) {
        // halt anyway
      }
      System.err.println(java.time.LocalTime.now() + " MINIYARN stopped");
      System.err.flush();
      Runtime.getRuntime().halt(0);
    }));
    cluster.init(c);
    cluster.start(); // 3.x: also waits up to 5 s for the NM to register
    routeGuiceToResourceManager(cluster);

    Configuration live = cluster.getConfig();
    write(new File(confDir, "yarn-site.xml"), live); // full effective config, like Spark/Kyuubi tests do
    Configuration core = new Configuration(false);
    core.set("fs.defaultFS", "file:///");
    write(new File(confDir, "core-site.xml"), core);
    Path tmp = confDir.toPath().resolve("READY.tmp");
    Files.writeString(tmp, "http://" + live.get(YarnConfiguration.RM_WEBAPP_ADDRESS) + "\n");
    Files.move(tmp, confDir.toPath().resolve("READY"), StandardCopyOption.ATOMIC_MOVE);
    System.out.println("MINIYARN READY rm=" + live.get(YarnConfiguration.RM_ADDRESS)
        + " web=" + live.get(YarnConfiguration.RM_WEBAPP_ADDRESS));
    System.out.flush();

    // Block until stdin reaches EOF (the parent closed the pipe or died), then exit through the shutdown hook.
    InputStream in = System.in;
    byte[] buf = new byte[256];
    try {
      while (in.read(buf) >= 0) {
        // ignore input
      }
    } catch (java.io.IOException e) {
      // stdin unusable: treat as EOF
    }
    System.err.println(java.time.LocalTime.now() + " MINIYARN stdin closed");
    System.exit(0);
  }

  // The RM and NM webapps both filter through Guice's GuiceFilter, whose pipeline is a static field that the last
  // injector created (the NM's) overwrites ("Multiple Servlet injectors detected"): /ws/v1/cluster/* on the RM web
  // port then answers 404 "controller for v1 not found" from the NM's router.  Point the static pipeline back at
  // the RM's.  The NM's web UI and REST API are then unusable; read container logs from
  // ./target/test/data/miniyarn/*/miniyarn-logDir-nm-0_0/<app>/<container>/ instead.
  private static void routeGuiceToResourceManager(MiniYARNCluster cluster) throws Exception {
    Object rm = cluster.getResourceManager();
    Method getWebapp = ResourceManager.class.getDeclaredMethod("getWebapp");
    getWebapp.setAccessible(true);
    Object webapp = getWebapp.invoke(rm);
    Field guiceFilterField = Class.forName("org.apache.hadoop.yarn.webapp.WebApp").getDeclaredField("guiceFilter");
    guiceFilterField.setAccessible(true);
    Object guiceFilter = guiceFilterField.get(webapp);
    Class<?> gf = guiceFilter.getClass();
    Field injected = gf.getDeclaredField("injectedPipeline");
    injected.setAccessible(true);
    Field pipeline = gf.getDeclaredField("pipeline");
    pipeline.setAccessible(true);
    pipeline.set(null, injected.get(guiceFilter));
  }

  private static void write(File f, Configuration conf) throws Exception {
    File tmp = new File(f.getPath() + ".tmp");
    try (OutputStream out = new FileOutputStream(tmp)) {
      conf.writeXml(out);
    }
    Files.move(tmp.toPath(), f.toPath(), StandardCopyOption.ATOMIC_MOVE);
  }
}
